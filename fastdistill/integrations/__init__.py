"""Integrations with training frameworks. Each is a submodule importing its framework, so importing
``fastdistill`` never requires them:
``from fastdistill.integrations.hf import DistillationArguments, DistillationTrainer``."""

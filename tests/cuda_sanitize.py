"""A small run of the CUDA kd_loss kernel for compute-sanitizer (``make bench-gpu``'s sanitize stage runs it under
memcheck and under racecheck; not a pytest file). Every residency (cluster on sm_90 only), a vocabulary that is and
one that is not a multiple of 8, K = 3 with teacher weights, labels with ignored rows, CE, sample weights, gradients
to the student and the teachers, each ensemble, a closed-form and a two-sweep divergence: what memcheck needs to see
every access pattern and racecheck every barrier (cluster barriers and distributed shared memory included).

    compute-sanitizer --tool racecheck --kernel-regex kns=kd_row_kernel python tests/cuda_sanitize.py
"""

import os
import sys

import torch

import fastdistill


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    torch.manual_seed(0)
    residencies = ["global", "smem"] + (["cluster"] if torch.cuda.get_device_capability()[0] >= 9 else [])
    n, k = 6, 3
    launches = 0
    for residency in residencies:
        os.environ["FASTDISTILL_CUDA_RESIDENCY"] = residency
        os.environ["FASTDISTILL_CUDA_CLUSTER"] = "4" if residency == "cluster" else ""
        for v in (1000, 4099):
            labels = torch.randint(0, v, (n,), device="cuda")
            labels[1] = -100
            tw = torch.rand(k, n, device="cuda") + 0.1
            sw = torch.rand(n, device="cuda")
            for divergence in ("kl", "jsd"):
                for ensemble in ("prob_mean", "logit_mean", "loss_mean"):
                    s = torch.randn(n, v, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                    ts = [torch.randn(n, v, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(k)]
                    loss = fastdistill.kd_loss(s, ts, divergence=divergence, ensemble=ensemble, labels=labels,
                                               ce_weight=0.3, teacher_weights=tw, sample_weight=sw, temperature=2.0,
                                               backend="cuda")  # fmt: skip
                    loss.backward()
                    launches += 1
                    if not torch.isfinite(loss):
                        print(f"non-finite loss: {residency} V={v} {divergence} {ensemble}")
                        return 2
    torch.cuda.synchronize()
    print(f"ok: {launches} launches ({', '.join(residencies)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A small run of the CUDA kd_loss kernel for compute-sanitizer (``make bench-gpu``'s sanitize stage runs it under
memcheck, racecheck and synccheck; not a pytest file). Every residency (cluster on sm_90 only), v1 and pipelined (two
row groups over six rows: every block walks three rows through both of its buffers), a vocabulary that is and one that
is not a multiple of 8, K = 3 with teacher weights (one of them 0), labels with ignored rows, CE, sample weights (one
row's 0), gradients to the student and the teachers, each ensemble, a closed-form and a two-sweep divergence: what
memcheck needs to see every access pattern and racecheck every barrier (cluster barriers and distributed shared memory
included). Strict launches: each residency runs as named, never a fallback.

    compute-sanitizer --tool racecheck --kernel-name kns=kd_row_kernel python tests/cuda_sanitize.py
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
    # the riskiest first (distributed shared memory, cluster barriers, buffers reused across rows): a run that its
    # time slot cuts short has checked those
    residencies = ["smem+pipe", "smem", "global"]
    if torch.cuda.get_device_capability()[0] >= 9:
        residencies = ["cluster+pipe", "cluster"] + residencies
    os.environ["FASTDISTILL_CUDA_STRICT"] = "1"  # each residency as named, never a fallback
    n, k = 6, 3
    launches = 0
    for residency in residencies:
        where, _, pipe = residency.partition("+")
        os.environ["FASTDISTILL_CUDA_RESIDENCY"] = where
        os.environ["FASTDISTILL_CUDA_CLUSTER"] = "4" if where == "cluster" else ""
        os.environ["FASTDISTILL_CUDA_PIPELINE"] = "1" if pipe else "0"
        os.environ["FASTDISTILL_CUDA_GROUPS"] = "2" if pipe else ""
        for v in (1000, 4099):
            labels = torch.randint(0, v, (n,), device="cuda")
            labels[1] = -100
            tw = torch.rand(k, n, device="cuda") + 0.1
            tw[1, 2] = 0.0  # a dropped teacher (never copied, never read)
            sw = torch.rand(n, device="cuda")
            sw[4] = 0.0  # a skipped row (no copy, no reduction)
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
        print(f"{residency}: done", flush=True)  # (a run cut by its time slot still says how far it got)
    torch.cuda.synchronize()
    print(f"ok: {launches} launches ({', '.join(residencies)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ops and their plumbing: ``inputs`` (one record per op: its arguments by name), ``divergences`` (the
divergence table), ``reference`` (the math), ``dispatch`` (which backend runs), ``registration`` (fake kernels and
autograd), ``extension`` (loading ``fastdistill._C``), ``triton`` (the Triton kernels and their ops)."""

"""One module per framework, each with the same functions.

Every backend module defines:

- ``NAME``: its name.
- ``static_shape(x)``: ``x``'s shape as a tuple, None for dims unknown at trace time.
- ``resolve_device(spec)``: the framework's device for a spec (``None`` = best available,
  ``"cpu"``, ``"cuda"``/``"gpu"``, ``"cuda:1"``, ``"tpu"``, ``"mps"``).
- ``asarray(a, device=None)``: any array (NumPy or another framework's) as this framework's.
- ``to_numpy(a)``: this framework's array as NumPy.
- ``to_backend(params, device=None)``: params with every array converted.
- ``conv_bn(x, params, plan)``: the op; ``plan`` (:class:`convbn.geometry.Plan`) carries the
  validated geometry and the mode. Returns ``y`` in eval, ``(y, new_params)`` in training.
- ``empty_output(x, shape)``: zeros of ``shape`` in ``x``'s dtype, on ``x``'s device, for a
  zero-size batch (``conv_bn`` never sees one; see :func:`convbn.api.empty_batch`).
- ``fuse(params)``: ``(kernel, bias)`` with BatchNorm folded into the conv, HWIO.
- ``sync_group(sync)``: the replicas ``conv_bn(..., sync=sync)`` shares statistics across, in the
  framework's terms (a process group, axis names, a replica context), or a ``ConvBNError`` saying
  what is missing for it.
- ``train_sync(x, params, plan, group)``: training with the batch statistics of every replica
  (:func:`convbn.backends._common.combine_moments`); returns ``(y, new_params)`` with the same new
  moving statistics on every replica. Runs for an empty local batch too: it still takes part in
  the collectives.

A backend module imports its framework at the top: it is only loaded after dispatch chose it.
"""

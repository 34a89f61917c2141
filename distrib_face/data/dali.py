"""The DALI pipeline: encoded bytes in through ``external_source``, normalised CHW tensors out.

``fn.external_source`` pulls whole batches from a Python iterable in the thread that runs the pipeline.
An iterable source gives one epoch only unless ``cycle="raise"`` (then ``StopIteration`` ends the epoch
and ``pipe.reset()`` starts the next), which is what the loader uses. Decoding runs on ``mixed`` (nvJPEG,
output on the GPU) when the loader's device is CUDA, else on the CPU with ``device_id=None``, which needs
no GPU or driver at all.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch

from distrib_face.data.augment import AugmentConfig


def build_pipeline(source: Iterable[Any], *, batch_size: int, image_size: tuple[int, int], resize: bool,
                   augment: AugmentConfig, device: torch.device, num_threads: int, seed: int,
                   half: bool = False, prefetch_queue_depth: int = 2) -> Any:
    """Build a DALI pipeline reading ``(encoded images, labels)`` batches from ``source``.

    Args:
        source: an iterable whose iterator yields ``(list of uint8 1-D arrays, list of int64 0-d arrays)``,
            plus, when ``augment.flip``, a list of int32 0-d mirror flags.
        batch_size: the largest batch ``source`` yields.
        image_size: output ``(H, W)``.
        resize: resize every decoded image to ``image_size`` (when the shards' size differs or varies).
        augment: which augmentations run (see :mod:`distrib_face.data.augment`).
        device: ``cuda[:N]`` decodes on ``mixed`` on that GPU; anything else on the CPU.
        num_threads: DALI CPU worker threads.
        seed: seed of DALI's random operators.
        half: output fp16 instead of fp32.
        prefetch_queue_depth: batches DALI prepares ahead.

    Returns:
        A built ``nvidia.dali.Pipeline`` whose outputs are images [B, 3, H, W] in [-1, 1] and labels [B].
    """
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath

    gpu = device.type == "cuda"
    device_id = (device.index or 0) if gpu else None
    height, width = image_size

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=prefetch_queue_depth)
    def face_pipeline():  # type: ignore[no-untyped-def]
        if augment.flip:
            # The mirror flags come with the batch (decided per sample from (seed, epoch, position) by the
            # loader), so a resumed run flips exactly what the uninterrupted run flipped.
            jpegs, labels, mirror = fn.external_source(source=source, num_outputs=3, cycle="raise", batch=True,
                                                       dtype=[types.UINT8, types.INT64, types.INT32])
        else:
            jpegs, labels = fn.external_source(source=source, num_outputs=2, cycle="raise", batch=True,
                                               dtype=[types.UINT8, types.INT64])
            mirror = 0
        images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
        # From here every op runs where its input lives (CPU, or the GPU after "mixed"). The random
        # parameters are CPU argument inputs, which CPU and GPU operators take alike; no arithmetic touches
        # the images, so the graph is the same on both devices.
        if augment.random_resized_crop is not None:
            images = fn.random_resized_crop(images, size=[height, width],
                                            random_area=list(augment.random_resized_crop),
                                            random_aspect_ratio=list(augment.crop_ratio), num_attempts=10)
        elif resize:
            images = fn.resize(images, resize_x=width, resize_y=height)
        if augment.color_jitter > 0 or augment.grey_prob > 0:
            j = augment.color_jitter
            twist: dict[str, Any] = {}
            saturation: Any = 1.0
            if j > 0:
                twist["brightness"] = fn.random.uniform(range=[1 - j, 1 + j])
                twist["contrast"] = fn.random.uniform(range=[1 - j, 1 + j])
                saturation = fn.random.uniform(range=[1 - j, 1 + j])
            if augment.grey_prob > 0:
                # saturation 0 is grey. coin_flip makes only bool / uint8 / int32 (dtype=FLOAT was the
                # "Critical error in pipeline" that sent every batch to the PIL fallback)
                keep = 1 - fn.random.coin_flip(probability=augment.grey_prob, dtype=types.INT32)
                saturation = saturation * fn.cast(keep, dtype=types.FLOAT)
            twist["saturation"] = saturation
            images = fn.color_twist(images, **twist)
        if augment.blur_prob > 0:
            # A blur for a fraction of the samples without blending two images: the chosen ones get a
            # Gaussian window of 2 * ceil(3 sigma) + 1 taps, the others a window of one tap (the identity).
            sigma = fn.random.uniform(range=list(augment.blur_sigma))
            chosen = fn.random.coin_flip(probability=augment.blur_prob, dtype=types.INT32)
            radius = fn.cast(dmath.ceil(sigma * 3.0), dtype=types.INT32)
            window = 1 + 2 * chosen * radius
            images = fn.gaussian_blur(images, sigma=sigma, window_size=window)
        images = fn.crop_mirror_normalize(images, mean=[127.5] * 3, std=[127.5] * 3, output_layout="CHW",
                                          dtype=types.FLOAT16 if half else types.FLOAT, mirror=mirror)
        return images, labels

    pipe = face_pipeline()
    pipe.build()
    return pipe


def outputs_to_torch(images: Any, labels: Any, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy one batch of DALI outputs into fresh torch tensors on ``device`` (DALI reuses its buffers)."""
    label_array = np.array(labels.as_tensor(), dtype=np.int64, copy=True).reshape(-1)
    label_tensor = torch.from_numpy(label_array).to(device)
    if device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        dense = images.as_tensor()
        out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))
        return out.to(dtype), label_tensor
    array = np.array(images.as_tensor(), copy=True)
    return torch.from_numpy(array).to(device=device, dtype=dtype), label_tensor

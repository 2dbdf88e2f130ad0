"""A short video file written with PyAV, decoded by transformers' video loader (PyAV backend), processed (by the
real video processor where torchvision imports) and pruned."""
import av
import numpy as np
import pytest
import torch
from transformers.video_utils import load_video

import reference as R
import tiny_models as tm
import vtr

pytestmark = pytest.mark.video


def write_mp4(path, frames=8, height=48, width=64, fps=4, seed=0):
    rng = np.random.default_rng(seed)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(frames):
            image = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.mark.parametrize("method", ["dart", "divprune"])
@pytest.mark.parametrize("family", tm.VIDEO_FAMILIES)
def test_video_file(tmp_path, family, method):
    frames, metadata = load_video(str(write_mp4(tmp_path / "clip.mp4")), num_frames=4, backend="pyav")
    assert frames.shape == (4, 48, 64, 3) and metadata.total_num_frames == 8
    model, proc = tm.build(family)
    inputs = tm.video_inputs(family, proc, videos=[frames])
    with vtr.patch(model, method, ratio=0.75) as handle, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
    record = handle.last
    assert record.layout.rows[0].spans[0].kind == "video"
    assert 0 < record.n_kept[0] < record.n_visual[0]
    lm_inputs = R.capture_lm_inputs(model, inputs, generate=True)
    _, expected, _ = R.reference_for(model, handle.method, lm_inputs, record.index, 4)
    assert (torch.stack(out.logits, 1) - expected).abs().max() <= 1e-5

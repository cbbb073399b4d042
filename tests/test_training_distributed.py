import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from test_evaluate import write_colour_folder
from transformers import AutoModelForImageTextToText

from mmfuse.training.data import JsonLinesDataset, VisionTextCollator

SCRIPT = os.path.join(os.path.dirname(__file__), "accelerate_train_script.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_cpu_training(tmp_path, tiny_projection):
    data = write_colour_folder(str(tmp_path / "data"), 8)
    output = tmp_path / "model"
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    # Without mpirun, `--cpu` starts a single process; `--multi_gpu` starts two through torchrun, and
    # each finds no GPU, so accelerate sets up multi-CPU data parallelism on gloo.
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]
    # HF_HOME keeps a user's accelerate config file out of the run, HF_HUB_OFFLINE keeps it off the
    # network and an empty CUDA_VISIBLE_DEVICES keeps it on the CPU where GPUs exist.
    environment = dict(
        os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""
    )
    completed = subprocess.run(
        command + [SCRIPT, data, str(output)], env=environment, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]

    reports = []
    for rank in (0, 1):
        with open(output / f"rank-{rank}.json", encoding="utf-8") as file:
            reports.append(json.load(file))
    for rank, report in enumerate(reports):
        assert report["process_index"] == rank
        assert report["world_size"] == 2
        assert report["backend"] == "gloo"
        assert report["global_step"] == 2
        # Each process encodes only the images of its own shard of the batches.
        assert 1 <= report["images_encoded"] <= 4
    # Data parallelism keeps the replicas identical after every step.
    assert reports[0]["projector_sum"] == pytest.approx(reports[1]["projector_sum"], rel=1e-6)

    _, processor = tiny_projection
    model = AutoModelForImageTextToText.from_pretrained(str(output)).eval()
    batch = VisionTextCollator(processor)(list(JsonLinesDataset(data))[:2])
    batch.pop("image_ids")
    assert torch.isfinite(model(**batch).loss)

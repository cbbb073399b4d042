"""Train a tiny projection model for two steps; run by `accelerate launch` from test_training_distributed.py.

Usage: accelerate_train_script.py DATA_FOLDER OUTPUT_FOLDER. Every process writes
`OUTPUT_FOLDER/rank-N.json` with what it saw, and the main process saves the trained model.
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from conftest import config_from_dict  # noqa: E402
from tiny import build_tokenizer, text_config, vision_config  # noqa: E402
from transformers import AutoModel, AutoModelForCausalLM  # noqa: E402

from mmfuse.compose import compose_projection  # noqa: E402
from mmfuse.training.data import JsonLinesDataset  # noqa: E402
from mmfuse.training.trainer import train  # noqa: E402


def main(data_folder: str, output_folder: str) -> None:
    torch.set_num_threads(1)
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    vision_model = AutoModel.from_config(config_from_dict(vision_config()))
    language_model = AutoModelForCausalLM.from_config(config_from_dict(text_config(vocab_size=len(tokenizer))))
    model, processor = compose_projection(vision_model, language_model, tokenizer)

    result = train(
        model,
        processor,
        JsonLinesDataset(data_folder),
        output_folder,
        stage="lora",
        lora_rank=2,
        batch_size=2,
        max_steps=2,
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = result.trainer
    report = {
        "process_index": trainer.args.process_index,
        "world_size": trainer.args.world_size,
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "global_step": trainer.state.global_step,
        "images_encoded": result.feature_cache.num_computed,
        "projector_sum": float(sum(p.sum() for p in result.model.multi_modal_projector.parameters())),
    }
    with open(os.path.join(output_folder, f"rank-{report['process_index']}.json"), "w", encoding="utf-8") as file:
        json.dump(report, file)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

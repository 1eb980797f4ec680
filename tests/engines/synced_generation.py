"""One rank of the synced-generation test (tests/engines/test_engines.py): run by two processes, gloo.

Rank 0 samples 4 rows, rank 1 only 2, both in calls of at most 2 rows under ``synced_gpus`` (every
decoding step a collective, as under FSDP). Writes each rank's ``generate`` calls and completions.
"""

import json
import sys

import torch
import torch.distributed as dist


def main(model_folder: str, output: str) -> None:
    from cppo_lightning.engines import HFEngine
    from cppo_lightning.models import PolicyConfig, load_policy
    from cppo_lightning.rollout import repeat_rows
    from cppo_lightning.sampling import EvaluationSampling
    from datamodules import SyntheticTaskConfig, SyntheticVQADataModule
    from helpers import count_generate_calls

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    data = SyntheticVQADataModule(
        task=SyntheticTaskConfig(image_size=112),
        train_size=2,
        val_size=0,
        test_size=0,
        batch_size=2,
        processor_name_or_path=model_folder,
    )
    data.setup("fit")
    prompts = next(iter(data.train_dataloader()))
    policy = load_policy(PolicyConfig(model_folder, finetuning="full"), reference=False)
    calls = count_generate_calls(policy.model)
    rows = repeat_rows(prompts, 2, torch.device("cpu"))[: 4 if rank == 0 else 2]
    config = EvaluationSampling(
        samples_per_prompt=2, temperature=0.0, max_new_tokens=6, generation_rollouts=2
    )
    generation = HFEngine(synced_gpus=True).generate(policy, prompts, rows, config, seed=0)
    with open(output, "w") as file:
        json.dump({"calls": calls, "rows": len(generation.completion_ids)}, file)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])

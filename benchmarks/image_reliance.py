"""Does a policy read the image? Answer accuracy with the image, with ``I-``, and with a flat grey image.

Run: ``.venv/bin/python benchmarks/image_reliance.py runs/demo/warmstart/model [--config configs/demo/cppo.yaml]``

For each held-out question of the config's synthetic task, the warm start's target text is
teacher-forced and the answer's first token is read off the policy's argmax, per question family and
per view: the original image ``I``, the information-removing view ``I-`` (the release's pool), and the
image replaced by flat grey. A policy that reads the image is far more accurate with ``I`` than with
grey; one that answers from question priors is not. The views come out of the same DataModule code as
training (the grey image is an albumentations ``Lambda`` passed as the masked view's pool). Also prints the mean log-probability of the whole reference answer.

This is how the demo task was sized: with shapes smaller than one 28 px visual token, the tiny VLM's
warm start was as accurate on grey images as on real ones.
"""

from __future__ import annotations

import argparse
import collections
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from cppo_lightning.batch import MASKED, ORIGINAL, REMOVING  # noqa: E402
from cppo_lightning.models import PolicyConfig, load_policy  # noqa: E402
from cppo_lightning.models.scoring import completion_logits  # noqa: E402
from cppo_lightning.objectives import token_logprobs  # noqa: E402
from cppo_lightning.warmstart import DEFAULT_TARGET, target_ids  # noqa: E402
from datamodules import SyntheticTaskConfig, SyntheticVQADataModule  # noqa: E402
from datamodules.perturbations import PerturbationPool  # noqa: E402

GREY = "grey"


def grey_pool() -> PerturbationPool:
    """A pool whose one transform paints the whole image grey (128)."""
    return PerturbationPool([A.Lambda(image=_flat_grey, p=1.0)], view=MASKED)


def _flat_grey(image: np.ndarray, **_) -> np.ndarray:
    return np.full_like(image, 128)


def answer_starts(tokenizer, template: str, answers: list[str]) -> list[int]:
    """Index of each answer's first token in its target (where it departs from the text before it)."""
    prefix = tokenizer(template.split("{answer}")[0].format(), add_special_tokens=False)["input_ids"]
    starts = []
    for answer in answers:
        ids = tokenizer(template.format(answer=answer), add_special_tokens=False)["input_ids"]
        starts.append(
            next((i for i, (a, b) in enumerate(zip(ids, prefix)) if a != b), min(len(ids), len(prefix)))
        )
    return starts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="model folder (e.g. runs/demo/warmstart/model)")
    parser.add_argument("--config", default="configs/demo/cppo.yaml", help="config naming the synthetic task")
    parser.add_argument("--questions", type=int, default=256)
    parser.add_argument("--seed", type=int, default=123)
    options = parser.parse_args()
    task = yaml.safe_load(open(options.config))["data"]["init_args"]["task"]
    data = SyntheticVQADataModule(
        task=SyntheticTaskConfig(**task),
        train_size=options.questions,
        val_size=0,
        test_size=0,
        batch_size=32,
        processor_name_or_path=options.model,
        views=[ORIGINAL, REMOVING, MASKED],
        masked_pool=grey_pool(),
        shuffle=False,
        seed=options.seed,
    )
    data.setup("fit")
    policy = load_policy(PolicyConfig(options.model, finetuning="full"), reference=False)
    policy.model.eval()
    template = DEFAULT_TARGET
    views = {ORIGINAL: "image I", REMOVING: "I-", MASKED: GREY}
    correct: dict[str, collections.Counter] = {view: collections.Counter() for view in views}
    logprob: dict[str, collections.Counter] = {view: collections.Counter() for view in views}
    count: collections.Counter = collections.Counter()
    for batch in data.train_dataloader():
        tokenizer = policy.processor.tokenizer
        ids, mask = target_ids(tokenizer, template, batch.answers)
        starts = answer_starts(tokenizer, template, batch.answers)
        rows = torch.arange(len(batch))
        first = torch.tensor(starts)
        families = [meta.get("family", "all") for meta in batch.metadata]
        count.update(families)
        answer_mask = mask & (torch.arange(ids.shape[1])[None] >= first[:, None])
        answer_mask[rows, mask.sum(1) - 1] = False  # not the EOS
        with torch.no_grad():
            for view in views:
                logits = completion_logits(policy.model, batch.model_inputs(view), ids, mask)
                hits = logits[rows, first].argmax(-1) == ids[rows, first]
                scores = (token_logprobs(logits, ids) * answer_mask).sum(1)
                for family, hit, score in zip(families, hits.tolist(), scores.tolist()):
                    correct[view][family] += hit
                    logprob[view][family] += score
    print(f"model {options.model}; task of {options.config}; {sum(count.values())} questions")
    print(
        "family          n"
        + "".join(f"{'acc ' + name:>13}" for name in views.values())
        + "   answer log-prob I / grey"
    )
    for family in sorted(count):
        n = count[family]
        accuracies = "".join(f"{correct[view][family] / n:13.3f}" for view in views)
        print(
            f"{family:14s}{n:3d}{accuracies}   {logprob[ORIGINAL][family] / n:7.3f} / {logprob[MASKED][family] / n:7.3f}"
        )


if __name__ == "__main__":
    main()

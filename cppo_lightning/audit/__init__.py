"""Auditing CPPO's perturbation pools before training: does ``I+`` preserve and ``I-`` remove what the task needs?

CPPO rests on one assumption: the information-preserving view ``I+`` keeps what the answer needs and the
information-removing view ``I-`` takes it away. When it fails, the Contrastive Perception Loss pushes the
wrong way (it makes the policy insensitive to a change that alters the answer). This module measures it
for a policy and a set of views, before any training:

- **accuracy** under the original image ``I``, under each view and under a flat-grey image (the floor:
  nothing of the image left), as sampled avg@k: ``k`` completions per question at the rollout temperature,
  graded by the evaluation grader; the views of a batch are stacked into one ``generate`` call with the same
  random numbers for every view (:class:`SharedNoiseSampler`), so a view that does not change the image
  gives exactly the original's completions and two views' accuracies differ by what the views do;
- **divergences** of the policy's next-token distributions under the view from those under ``I``, on the
  completions sampled under ``I``: the k3 estimate the CPL uses, ``k3(lp^I, lp^view)``, and the exact
  full-vocabulary ``KL(pi(.|I) || pi(.|view))``, and the **entropy shift** ``H(view) - H(I)``, all from one
  forward over the stacked views (:class:`~cppo_lightning.update.RolloutScorer`, the update's own path);
- for every view, as if it were ``I-``: the fraction of tokens whose entropy rises, the perception-token
  fraction CPPO would select (``perception_token_mask`` without gating) and how much of the entropy rise
  those tokens carry (**concentration**);
- the **CPL direction** of each ``(I+ transform, I- transform)`` pair and of the pools as configured: the
  fraction of CPPO's perception tokens (selected with that ``I-``, rows with ``A > 0`` under gating, as in
  training) where ``D+ < D-``, with the mean ``D+``, ``D-`` and CPL (neutral value ``log 2``).

The verdict rule (:class:`VerdictRule`) places each view on a scale from the identity (0: the policy
behaves as with the original image) to the grey floor (1: as with no image), by accuracy and by
divergence:

- ``accuracy_position = (acc(I) - acc(view)) / (acc(I) - acc(grey))``, defined when the policy is at least
  ``min_accuracy_gap`` more accurate with the image than with grey;
- ``divergence_position = KL(view) / KL(grey)``, defined when ``KL(grey) >= min_floor_divergence``;
- ``position`` = the larger of the defined ones (the view moved the policy this far towards "no image"
  by at least one measure); ``inconclusive`` when neither is defined (the policy does not read the image).

An ``I+`` transform is **preserving** when ``position <= preserving_max`` (0.25) and **misplaced** (it removes
what the task needs) when ``position >= removing_min`` (0.5); an ``I-`` transform is **removing** when
``position >= removing_min`` and **misplaced** (it leaves what the task needs) when ``position <=
preserving_max``; in between either is **partial**. Verdicts are given over all examples and per group of
questions (a metadata column, e.g. the synthetic task's ``family``), so that a transform that is harmless
for counting but changes the answer of colour questions is flagged for those.
"""

# The names of the three modules (each lists its own in __all__), importable from the package as before.
from cppo_lightning.audit import measurements, verdicts, views
from cppo_lightning.audit.measurements import *  # noqa: F403
from cppo_lightning.audit.verdicts import *  # noqa: F403
from cppo_lightning.audit.views import *  # noqa: F403

__all__ = [*views.__all__, *verdicts.__all__, *measurements.__all__]

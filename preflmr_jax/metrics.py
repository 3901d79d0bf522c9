"""M2KR retrieval metrics: Recall@K and PseudoRecall@K.

Rankings are per-query sequences of passage ids, best first (e.g. `search.exact_search` indices
mapped to `passage_id`s). Both metrics score each query 0 or 1 and average over queries.

  Recall@K:        hit when any of the top-K passage ids is in the query's `pos_item_ids`.
  PseudoRecall@K:  hit when any answer, stripped and lower-cased, is a substring of one of the top-K
                   passages' text lower-cased.

The PseudoRecall rule follows the official PreFLMR evaluation script
(LinWeizheDragon/FLMR examples/example_use_preflmr.py, "Pseudo Recall@K"): per retrieved passage it
tests `answer.strip().lower() in passage.lower()`, then takes the max of the hits over the first K.
What that implies, and what this module does the same way:
  * plain substring, no word boundaries: "cat" hits "concatenate";
  * only the answer's ends are stripped; whitespace inside it is not normalised ("new  york" does not
    hit "new york"), and the passage is only lower-cased (str.lower, not casefold);
  * an answer that is empty after stripping is a substring of every passage, so it is a hit at any K;
  * a query with no answers (or, for Recall, no positives) is a miss, and stays in the mean.
(The older RAVQA `compute_retrieval_metrics` used `answer.lower() in passage.lower()` without the
strip; M2KR numbers come from the FLMR script.)

Rankings are taken as given: duplicates are not removed (a repeated id uses up a slot), and a
ranking shorter than K is scored on the passages it has, as the reference slices `hits[:K]`.
Score ties are the search's business (`search` breaks them by lower corpus index).
"""

from __future__ import annotations

import numbers
from typing import Any, Collection, Hashable, Iterable, Mapping, Optional, Sequence

# Headline metric per M2KR task (keys as in `data.m2kr.TASKS`). CC3M has no published eval headline
# (it is a training-only caption task, no answers): we report Recall@5, like the other caption /
# entity tasks. SAMPLE is the tiny bundled task, scored like IGLUE.
HEADLINE = {
    "WIT": "Recall@10",
    "IGLUE": "Recall@1",
    "KVQA": "Recall@5",
    "CC3M": "Recall@5",
    "MSMARCO": "Recall@5",
    "OVEN": "Recall@5",
    "LLaVA": "Recall@1",
    "OKVQA": "PseudoRecall@5",
    "Infoseek": "PseudoRecall@5",
    "E-VQA": "PseudoRecall@5",
    "SAMPLE": "Recall@1",
}

__all__ = ["HEADLINE", "recall_at_k", "pseudo_recall_at_k", "task_metrics"]


def _check_ks(ks: Iterable[int]) -> list[int]:
  ks = list(ks)
  if not ks:
    raise ValueError("ks is empty: give at least one K")
  for k in ks:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
      raise ValueError(f"every K must be an integer >= 1, got {k!r} in ks={ks}")
  return sorted({int(k) for k in ks})


def _check_rankings(rankings: Sequence[Sequence[Any]], other: Sequence[Any], other_name: str):
  if len(rankings) != len(other):
    raise ValueError(f"{len(rankings)} rankings but {len(other)} {other_name}: one per query")
  if len(rankings) == 0:
    raise ValueError("no queries: rankings is empty")
  for i, ranking in enumerate(rankings):
    if len(ranking) == 0:
      raise ValueError(f"query {i} has no ranking (an empty list of passage ids)")


def _recall(first_hits: Sequence[Optional[int]], ks: list[int]) -> dict[int, float]:
  """first_hits[i]: rank (0-based) of query i's first hit, None for none -> {K: mean hit@K}."""
  n = len(first_hits)
  return {k: sum(h is not None and h < k for h in first_hits) / n for k in ks}


def recall_at_k(rankings: Sequence[Sequence[Hashable]],
                positives: Sequence[Collection[Hashable]],
                ks: Iterable[int]) -> dict[int, float]:
  """{K: fraction of queries with a positive passage id among their first K ranked ids}.

  Args:
    rankings: per query, passage ids best first (a list, or a row of an array).
    positives: per query, its `pos_item_ids`.
    ks: the cut-offs K (integers >= 1).
  """
  ks = _check_ks(ks)
  _check_rankings(rankings, positives, "positives")
  first_hits = []
  for ranking, pos in zip(rankings, positives):
    if isinstance(pos, (str, bytes)):
      raise ValueError(f"positives must be collections of ids per query, got the string {pos!r}")
    pos = set(pos)
    first_hits.append(next((r for r, pid in enumerate(ranking) if pid in pos), None))
  return _recall(first_hits, ks)


def _text(passage_text, pid, query):
  """passage_text[pid], failing clearly (a list must not wrap a negative index)."""
  try:
    if not isinstance(passage_text, Mapping) and pid < 0:
      raise IndexError(pid)
    return passage_text[pid]
  except (KeyError, IndexError, TypeError) as e:
    raise KeyError(f"query {query}: passage id {pid!r} has no text in passage_text") from e


def pseudo_recall_at_k(rankings: Sequence[Sequence[Hashable]],
                       answers: Sequence[Sequence[str]],
                       passage_text: Mapping[Hashable, str] | Sequence[str],
                       ks: Iterable[int]) -> dict[int, float]:
  """{K: fraction of queries with an answer inside one of their first K passages} (module doc).

  Args:
    rankings: per query, passage ids best first.
    answers: per query, its answer strings.
    passage_text: passage id -> passage text (a dict, or a list when the ids are corpus indices).
    ks: the cut-offs K (integers >= 1).
  """
  ks = _check_ks(ks)
  _check_rankings(rankings, answers, "answer lists")
  lowered = {}  # passage id -> lower-cased text; passages recur across queries
  first_hits = []
  for i, (ranking, query_answers) in enumerate(zip(rankings, answers)):
    if isinstance(query_answers, (str, bytes)):
      raise ValueError(f"answers must be lists of strings per query, got the string "
                       f"{query_answers!r} for query {i}")
    needles = [a.strip().lower() for a in query_answers]
    hit = None
    if needles:
      for r, pid in enumerate(ranking[:max(ks)]):
        if pid not in lowered:
          lowered[pid] = _text(passage_text, pid, i).lower()
        if any(needle in lowered[pid] for needle in needles):
          hit = r
          break
    first_hits.append(hit)
  return _recall(first_hits, ks)


def task_metrics(task: str,
                 rankings: Sequence[Sequence[Hashable]],
                 positives: Sequence[Collection[Hashable]],
                 ks: Iterable[int] = (1, 5, 10),
                 answers: Optional[Sequence[Sequence[str]]] = None,
                 passage_text: Optional[Mapping[Hashable, str] | Sequence[str]] = None,
                 headline: Optional[str] = None) -> dict[str, float]:
  """{"Recall@K": ..., "PseudoRecall@K": ...} for every K in `ks`, plus the task's headline.

  Recall@K is always computed. PseudoRecall@K needs `answers` and `passage_text` (both or neither);
  they are required for the tasks whose headline is PseudoRecall (OKVQA, Infoseek, E-VQA). The
  headline's K is added to `ks`, so `result[headline]` always exists. `headline` (e.g.
  "Recall@5") is `HEADLINE[task]` by default; a user's task gives its own.
  """
  headline = headline or HEADLINE.get(task)
  if headline is None:
    raise ValueError(f"unknown M2KR task {task!r} and no headline given; known tasks: "
                     f"{sorted(HEADLINE)}")
  ks = _check_ks(ks)
  headline_name, headline_k = headline.split("@")
  if (answers is None) != (passage_text is None):
    raise ValueError("PseudoRecall needs both answers and passage_text (got only one)")
  if headline_name == "PseudoRecall" and answers is None:
    raise ValueError(f"task {task}: the headline {headline} needs answers and passage_text")

  out = {}
  recall_ks = ks + [int(headline_k)] if headline_name == "Recall" else ks
  for k, v in recall_at_k(rankings, positives, recall_ks).items():
    out[f"Recall@{k}"] = v
  if answers is not None:
    pseudo_ks = ks + [int(headline_k)] if headline_name == "PseudoRecall" else ks
    for k, v in pseudo_recall_at_k(rankings, answers, passage_text, pseudo_ks).items():
      out[f"PseudoRecall@{k}"] = v
  return out

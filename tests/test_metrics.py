"""Recall@K and PseudoRecall@K on hand-computed cases; the headline table; clear errors."""

import numpy as np
import pytest

from preflmr_jax import metrics
from preflmr_jax.data import m2kr


def test_recall_hand_computed():
  rankings = [["a", "b", "c", "d"],   # first positive at rank 2 (0-based)
              ["x", "y", "z", "w"],   # no positive
              ["p", "q", "r", "s"]]   # several positives, the first at rank 0
  positives = [["c"], ["nope"], ["s", "p"]]
  got = metrics.recall_at_k(rankings, positives, [1, 2, 3, 4])
  assert got == {1: 1 / 3, 2: 1 / 3, 3: 2 / 3, 4: 2 / 3}


def test_recall_several_positives_any_counts():
  got = metrics.recall_at_k([["d", "c", "b"]], [{"a", "b", "c"}], [1, 2, 3])
  assert got == {1: 0.0, 2: 1.0, 3: 1.0}


def test_recall_duplicates_use_up_slots_and_no_positive_is_a_miss():
  # The repeated "a" takes rank 1; "b" is at rank 2 and only counts from K=3.
  got = metrics.recall_at_k([["a", "a", "b"], ["b", "a", "c"]], [["b"], []], [2, 3])
  assert got == {2: 0.0, 3: 0.5}


def test_recall_short_ranking_is_scored_on_what_it_has():
  got = metrics.recall_at_k([["a", "b"]], [["b"]], [1, 5])
  assert got == {1: 0.0, 5: 1.0}


def test_recall_accepts_arrays_and_integer_ids():
  indices = np.array([[3, 1, 2], [0, 2, 1]])
  got = metrics.recall_at_k(indices, [[1], [7]], np.array([1, 2]))
  assert got == {1: 0.0, 2: 0.5}


PASSAGES = {
    "p0": "The Eiffel Tower is in PARIS.",
    "p1": "Concatenate strings with plus.",
    "p2": "New York City",
    "p3": "nothing here",
}


def _pseudo(answers, ranking, ks=(1, 2, 3)):
  return metrics.pseudo_recall_at_k([ranking], [answers], PASSAGES, ks)


def test_pseudo_recall_case_and_surrounding_whitespace():
  # Answer and passage are lower-cased; the answer's surrounding whitespace is stripped.
  assert _pseudo(["  Paris \n"], ["p3", "p0"]) == {1: 0.0, 2: 1.0, 3: 1.0}


def test_pseudo_recall_substring_inside_a_word_counts():
  # Plain substring test, no word boundaries (as in the reference): "cat" hits "Concatenate".
  assert _pseudo(["cat"], ["p1"]) == {1: 1.0, 2: 1.0, 3: 1.0}


def test_pseudo_recall_inner_whitespace_is_not_normalised():
  assert _pseudo(["new  york"], ["p2"]) == {1: 0.0, 2: 0.0, 3: 0.0}
  assert _pseudo(["NEW YORK"], ["p2"]) == {1: 1.0, 2: 1.0, 3: 1.0}


def test_pseudo_recall_empty_answer_hits_everything_no_answers_hits_nothing():
  # Reference behaviour: "".strip() is a substring of every passage.
  assert _pseudo(["   "], ["p3"]) == {1: 1.0, 2: 1.0, 3: 1.0}
  assert _pseudo([], ["p0", "p1", "p2"]) == {1: 0.0, 2: 0.0, 3: 0.0}


def test_pseudo_recall_any_answer_and_mean_over_queries():
  rankings = [["p3", "p3", "p2"], ["p1", "p0"], ["p3"]]
  answers = [["tokyo", "york"], ["eiffel", "zzz"], ["here"]]
  got = metrics.pseudo_recall_at_k(rankings, answers, PASSAGES, [1, 2, 3])
  assert got == {1: 1 / 3, 2: 2 / 3, 3: 1.0}


def test_pseudo_recall_with_list_of_texts_and_index_ids():
  texts = ["alpha", "beta gamma", "delta"]
  got = metrics.pseudo_recall_at_k(np.array([[0, 1], [2, 0]]), [["GAMMA"], ["x"]], texts, [1, 2])
  assert got == {1: 0.0, 2: 0.5}
  with pytest.raises(KeyError, match="passage id -1"):
    metrics.pseudo_recall_at_k([[-1]], [["a"]], texts, [1])
  with pytest.raises(KeyError, match="query 0: passage id 'p9'"):
    metrics.pseudo_recall_at_k([["p9"]], [["a"]], PASSAGES, [1])


def test_errors_name_what_is_wrong():
  with pytest.raises(ValueError, match="query 1 has no ranking"):
    metrics.recall_at_k([["a"], []], [["a"], ["b"]], [1])
  with pytest.raises(ValueError, match="integer >= 1"):
    metrics.recall_at_k([["a"]], [["a"]], [0])
  with pytest.raises(ValueError, match="integer >= 1"):
    metrics.recall_at_k([["a"]], [["a"]], [1.5])
  with pytest.raises(ValueError, match="ks is empty"):
    metrics.recall_at_k([["a"]], [["a"]], [])
  with pytest.raises(ValueError, match="2 rankings but 1 positives"):
    metrics.recall_at_k([["a"], ["b"]], [["a"]], [1])
  with pytest.raises(ValueError, match="1 rankings but 2 answer lists"):
    metrics.pseudo_recall_at_k([["a"]], [["a"], ["b"]], {"a": ""}, [1])
  with pytest.raises(ValueError, match="no queries"):
    metrics.recall_at_k([], [], [1])
  with pytest.raises(ValueError, match="got the string"):
    metrics.pseudo_recall_at_k([["p0"]], ["paris"], PASSAGES, [1])


def test_headline_covers_every_task():
  assert set(metrics.HEADLINE) == set(m2kr.TASKS)
  assert metrics.HEADLINE["WIT"] == "Recall@10"
  assert metrics.HEADLINE["E-VQA"] == "PseudoRecall@5"


def test_task_metrics_keys_and_values():
  rankings = [["p3", "p0", "p1"], ["p2", "p1", "p0"]]
  positives = [["p0"], ["p9"]]
  answers = [["paris"], ["string"]]
  got = metrics.task_metrics("OKVQA", rankings, positives, ks=[1, 2], answers=answers,
                             passage_text=PASSAGES)
  assert got == {"Recall@1": 0.0, "Recall@2": 0.5,
                 "PseudoRecall@1": 0.0, "PseudoRecall@2": 1.0, "PseudoRecall@5": 1.0}
  # Recall headline: its K is added; no answers, no PseudoRecall.
  got = metrics.task_metrics("WIT", rankings, positives, ks=[1])
  assert got == {"Recall@1": 0.0, "Recall@10": 0.5}


def test_task_metrics_errors():
  with pytest.raises(ValueError, match="unknown M2KR task 'VQA'"):
    metrics.task_metrics("VQA", [["a"]], [["a"]])
  with pytest.raises(ValueError, match="E-VQA: the headline PseudoRecall@5 needs answers"):
    metrics.task_metrics("E-VQA", [["a"]], [["a"]])
  with pytest.raises(ValueError, match="both answers and passage_text"):
    metrics.task_metrics("OVEN", [["a"]], [["a"]], answers=[["x"]])

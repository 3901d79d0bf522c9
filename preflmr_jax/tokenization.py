"""PreFLMR query / document tokenisation (host side).

`QueryTokenizer` and `DocumentTokenizer` (numpy, HF tokenizers) reproduce the published FLMR
tokenizers:

  query:    [CLS] [Q] instruction: question [SEP] [MASK] ... [MASK]   (always max_length)
  document: [CLS] [D] passage [SEP] [PAD] ... [PAD]

Both tokenise `". " + text` so that the "." token right after [CLS] is the slot that the
marker overwrites. Query padding is [MASK] (ColBERT query augmentation): the encoder does not
attend to it (attention 0) but its outputs are scored.

The on-device token masks and the model's default mask ids are in `models/token_masks.py`.
"""

import functools
import logging
import os
import string
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from preflmr_jax import storage, user_errors
# `tiny_vocab()` pads with [unusedN] up to TINY_VOCAB_SIZE.
from preflmr_jax.models.token_masks import PAD_ID, TINY_VOCAB_SIZE  # noqa: F401
from preflmr_jax.user_errors import BadFile, ConfigError, MissingPath, NotAFolder

if TYPE_CHECKING:
  import transformers

_log = logging.getLogger(__name__)

# BERT special ids (bert-base-uncased layout; the tiny vocab keeps them).
Q_MARKER_ID = 1  # [unused0]
D_MARKER_ID = 2  # [unused1]
UNK_ID = 100
CLS_ID = 101
SEP_ID = 102
MASK_ID = 103

Q_MARKER_TOKEN = "[unused0]"
D_MARKER_TOKEN = "[unused1]"
INSTRUCTION_END = ":"

_VOCAB_FILE = "vocab.txt"
_TOKENIZER_FILE = "tokenizer.json"


# ---------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------


def load_bert_tokenizer(path) -> "transformers.BertTokenizerFast":
  """Loads an uncased BERT WordPiece tokenizer from a folder (never the hub).

  Args:
    path: a folder holding `vocab.txt` and/or `tokenizer.json` (HF layout), local or gs:// (then
      copied to a temporary local folder: transformers reads local files only).

  Returns:
    A fast tokenizer that lower-cases and strips accents like bert-base-uncased.
  """
  folder = storage.path(path, "tokenizer folder")
  path = os.fspath(folder)
  if folder.is_file():
    raise NotAFolder(f"Tokenizer folder {path!r} is a file: pass the folder that holds it.")
  if not folder.is_dir():
    raise MissingPath(f"Tokenizer folder {path!r} does not exist.")
  if not any((folder / f).is_file() for f in (_VOCAB_FILE, _TOKENIZER_FILE)):
    # `from_pretrained` happily returns an empty-vocab tokenizer for such a folder.
    raise MissingPath(
        f"Tokenizer folder {path!r} has neither {_VOCAB_FILE} nor {_TOKENIZER_FILE}.")
  import transformers  # Lazy: importing this module must not import it.
  # `BertTokenizerFast(vocab_file=...)` gives an all-[UNK] tokenizer in transformers 5.x;
  # `from_pretrained(dir)` reads vocab.txt / tokenizer.json correctly.
  with storage.local_copy(folder) as local:
    tok = transformers.BertTokenizerFast.from_pretrained(
        local, local_files_only=True, do_lower_case=True)
  if tok.vocab_size == 0 or tok.mask_token_id is None or tok.pad_token_id is None:
    raise BadFile(f"Tokenizer in {path!r} has no usable BERT vocabulary.")
  return tok


# ---------------------------------------------------------------------------
# Tiny deterministic vocab for CPU smoke configs.
# ---------------------------------------------------------------------------

# Common English words (plus M2KR instruction words) so that ordinary text is not
# tokenised letter by letter. Order matters: it fixes the ids.
_TINY_WORDS = """
the of and to a in is it you that he was for on are with as i his they be at one have this
from or had by hot word but what some we can out other were all there when up use your how
said an each she which do their time if will way about many then them write would like so
these her long make thing see him two has look more day could go come did number sound no
most people my over know water than call first who may down side been now find any new work
part take get place made live where after back little only round man year came show every
good me give our under name very through just form sentence great think say help low line
differ turn cause much mean before move right boy old too same tell does set three want air
well also play small end put home read hand port large spell add even land here must big
high such follow act why ask men change went light kind off need house picture try us again
animal point mother world near build self earth father head stand own page should country
found answer school grow study still learn plant cover food sun four between state keep eye
never last let thought city tree cross farm hard start might story saw far sea draw left late
run while press close night real life few north open seem together next white children begin
got walk example ease paper group always music those both mark often letter until mile river
car feet care second book carry took science eat room friend began idea fish mountain stop
once base hear horse cut sure watch color face wood main enough plain girl usual young ready
above ever red list though feel talk bird soon body dog family direct pose leave song measure
door product black short numeral class wind question happen complete ship area half rock order
fire south problem piece told knew pass since top whole king space heard best hour better true
during hundred five remember step early hold west ground interest reach fast verb sing listen
six table travel less morning ten simple several vowel toward war lay against pattern slow
center love person money serve appear road map rain rule govern pull cold notice voice unit
power town fine certain fly fall lead cry dark machine note wait plan figure star box noun
field rest correct able pound done beauty drive stood contain front teach week final gave
green quick develop ocean warm free minute strong special mind behind clear tail produce fact
street inch multiply nothing course stay wheel full force blue object decide surface deep
moon island foot system busy test record boat common gold possible plane age dry wonder laugh
thousand ago ran check game shape yes miss brought heat snow tire bring distant fill east
paint language among using provided image obtain documents address subsequent retrieve
document passage passages relevant information describe content based identify wikipedia
article entity shown photo given caption query visual knowledge object building located
capital france paris london english museum war history population born known named called
""".split()

# Frequent WordPiece continuations (bert-base-uncased has all of these).
_TINY_SUFFIXES = ("s", "es", "ed", "ing", "ly", "er", "est", "ion", "tion", "al", "ic", "ity",
                  "ment", "ness", "able", "ful", "less", "ous", "ive", "ize", "ist", "an")


@functools.lru_cache(maxsize=None)
def _tiny_vocab() -> tuple[str, ...]:
  specials = ["[PAD]"] + [f"[unused{i}]" for i in range(99)]
  specials += ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  chars = list(string.punctuation) + list(string.digits) + list(string.ascii_lowercase)
  pieces = ["##" + c for c in string.ascii_lowercase + string.digits]
  pieces += ["##" + s for s in _TINY_SUFFIXES]
  vocab = list(specials)
  seen = set(vocab)
  for w in chars + pieces + _TINY_WORDS:
    if w not in seen:
      seen.add(w)
      vocab.append(w)
  # Fill up like bert-base-uncased, whose [unused99].. follow [MASK]; they never match text.
  next_unused = 99
  while len(vocab) < TINY_VOCAB_SIZE:
    vocab.append(f"[unused{next_unused}]")
    next_unused += 1
  assert len(vocab) == TINY_VOCAB_SIZE, len(vocab)
  return tuple(vocab)


def tiny_vocab() -> list[str]:
  """A deterministic 768-entry uncased WordPiece vocab with BERT's special ids."""
  return list(_tiny_vocab())


def write_tiny_vocab(folder: str) -> str:
  """Writes `tiny_vocab()` to `folder/vocab.txt` (loadable by `load_bert_tokenizer`)."""
  storage.write_text(storage.path(folder, "vocab folder") / _VOCAB_FILE,
                     "\n".join(_tiny_vocab()) + "\n")
  return os.fspath(folder)


def tiny_tokenizer() -> "transformers.BertTokenizerFast":
  """An uncased BERT tokenizer over `tiny_vocab()`, built in memory."""
  import transformers  # Lazy, as in `load_bert_tokenizer`.
  vocab = {tok: i for i, tok in enumerate(_tiny_vocab())}
  return transformers.BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=512)


# ---------------------------------------------------------------------------
# Host-side tokenizers.
# ---------------------------------------------------------------------------


def first_token_id(tokenizer, text: str) -> int:
  ids = tokenizer.encode(text, add_special_tokens=False)
  if not ids:
    raise ValueError(f"Tokenizer maps {text!r} to no token.")
  return ids[0]


def mask_token_ids(tokenizer) -> tuple[int, tuple[int, ...]]:
  """(instruction-end ":" id, sorted ids of the single `string.punctuation` characters).

  As in the official FLMR model: each character's first token via
  `encode(c, add_special_tokens=False)[0]`.
  """
  colon = first_token_id(tokenizer, INSTRUCTION_END)
  punct = tuple(sorted({first_token_id(tokenizer, c) for c in string.punctuation}))
  return colon, punct


def _check_batch(texts, what: str) -> list[str]:
  if isinstance(texts, str):
    texts = [texts]
  texts = list(texts)
  if not texts:
    raise ValueError(f"Empty batch of {what}.")
  for i, t in enumerate(texts):
    if not isinstance(t, str):
      raise TypeError(f"{what} {i} is {type(t).__name__}, not str: {t!r}")
  return texts


def query_text(question: str, instruction: Optional[str] = None) -> str:
  """`instruction + " " + question`, the instruction ending with ":" (added if missing)."""
  if not instruction or not instruction.strip():
    return question
  instruction = instruction.rstrip()
  if not instruction.endswith(INSTRUCTION_END):
    instruction += INSTRUCTION_END
  return instruction + " " + question


def _token_id(tokenizer, token: str) -> int:
  tid = tokenizer.convert_tokens_to_ids(token)
  if tid is None or tid == tokenizer.unk_token_id:
    raise ValueError(f"Tokenizer vocabulary has no {token!r}.")
  return tid


class QueryTokenizer:
  """FLMR query tokenizer: `[CLS] [Q] text [SEP]` padded with [MASK] to `max_length`."""

  def __init__(self, tokenizer, max_length: int = 32):
    if max_length < 3:
      raise ValueError(f"max_length must be >= 3 ([CLS] [Q] [SEP]), got {max_length}.")
    self.tokenizer = tokenizer
    self.max_length = max_length
    self.marker_id = _token_id(tokenizer, Q_MARKER_TOKEN)
    self.instruction_token_id = first_token_id(tokenizer, INSTRUCTION_END)

  def __call__(self, questions: Sequence[str],
               instructions: Optional[Sequence[Optional[str]]] = None) -> dict[str, np.ndarray]:
    questions = _check_batch(questions, "question")
    if instructions is None:
      instructions = [None] * len(questions)
    instructions = list(instructions)
    if len(instructions) != len(questions):
      raise ValueError(
          f"{len(instructions)} instructions for {len(questions)} questions.")
    texts = [query_text(q, i) for q, i in zip(questions, instructions)]
    enc = self.tokenizer(
        [". " + t for t in texts], padding="max_length", truncation=True,
        max_length=self.max_length, return_tensors="np")
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    mask = np.asarray(enc["attention_mask"], dtype=np.int32)
    ids[:, 1] = self.marker_id
    ids[ids == self.tokenizer.pad_token_id] = self.tokenizer.mask_token_id
    self._warn_lost_instruction_end(ids, texts, instructions)
    return {"input_ids": ids, "attention_mask": mask}

  def _warn_lost_instruction_end(self, ids, texts, instructions):
    # Without ":" `query_token_mask` keeps the whole instruction in the score.
    has_end = (ids[:, 2:] == self.instruction_token_id).any(axis=1)
    for row, (text, instruction) in enumerate(zip(texts, instructions)):
      if instruction and instruction.strip() and not has_end[row]:
        _log.warning(
            "Query %d has an instruction but no %r token within %d tokens (truncated?); "
            "its instruction tokens will not be masked: %r",
            row, INSTRUCTION_END, self.max_length, text)


class DocumentTokenizer:
  """FLMR document tokenizer: `[CLS] [D] text [SEP]` padded with [PAD]."""

  def __init__(self, tokenizer, max_length: int = 512):
    if max_length < 3:
      raise ValueError(f"max_length must be >= 3 ([CLS] [D] [SEP]), got {max_length}.")
    self.tokenizer = tokenizer
    self.max_length = max_length
    self.marker_id = _token_id(tokenizer, D_MARKER_TOKEN)

  def __call__(self, texts: Sequence[str], padding: str = "max_length",
               pad_to_multiple_of: Optional[int] = None) -> dict[str, np.ndarray]:
    """Tokenises a batch of passages.

    Args:
      texts: passages.
      padding: "max_length" (static shape, as the official tokenizer) or "longest"
        (pad to the longest passage in the batch).
      pad_to_multiple_of: with "longest", round the length up to a multiple of this
        (capped at max_length) to limit recompiles.

    Returns:
      dict of int32 `input_ids` and `attention_mask`, `[B, L]`.
    """
    texts = _check_batch(texts, "document")
    if padding not in ("max_length", "longest"):
      raise ValueError(f"padding must be 'max_length' or 'longest', got {padding!r}.")
    enc = self.tokenizer(
        [". " + t for t in texts], padding=padding, truncation=True,
        max_length=self.max_length, return_tensors="np")
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    mask = np.asarray(enc["attention_mask"], dtype=np.int32)
    ids[:, 1] = self.marker_id
    if padding == "longest" and pad_to_multiple_of:
      # Done here because HF refuses a max_length that is not itself a multiple.
      width = min(-(-ids.shape[1] // pad_to_multiple_of) * pad_to_multiple_of, self.max_length)
      extra = ((0, 0), (0, width - ids.shape[1]))
      ids = np.pad(ids, extra, constant_values=self.tokenizer.pad_token_id)
      mask = np.pad(mask, extra)
    return {"input_ids": ids, "attention_mask": mask}


def tokenizer_from_config(name: str):
  """`config.tokenizer`: "tiny" (the built-in tiny vocab) or a local folder with a BERT vocab."""
  if not name:
    raise ConfigError("config.tokenizer is not set: pass --config.tokenizer=<local folder with the "
                      "bert-base-uncased vocab.txt> (e.g. a PreFLMR checkpoint's query_tokenizer/), "
                      "or 'tiny'")
  if name == "tiny":
    return tiny_tokenizer()
  with user_errors.naming("config.tokenizer", name, MissingPath, NotAFolder, BadFile):
    return load_bert_tokenizer(name)


def check_tokenizer(tokenizer, model_config) -> None:
  """Fails early when `tokenizer` does not fit `model_config` (a `PreFLMRConfig`): ids beyond the
  text encoder's embedding table (their lookups give NaN), or mask ids of another vocab."""
  hint = ("set --config.tokenizer to the folder of the vocab the model was built for (configs "
          "default to the bert-base-uncased ids; 'tiny' is the built-in tiny vocab)")
  vocab_size = model_config.text.vocab_size
  if len(tokenizer) > vocab_size:
    raise ConfigError(f"config.model.text.vocab_size={vocab_size}: the tokenizer has "
                      f"{len(tokenizer)} ids, beyond the embedding table; raise it to "
                      f"{len(tokenizer)} or {hint}")
  colon, punctuation = mask_token_ids(tokenizer)
  instruction_token_id, skip_token_ids = (model_config.instruction_token_id,
                                          model_config.skip_token_ids)
  if instruction_token_id != colon:
    raise ConfigError(f"config.model.instruction_token_id={instruction_token_id} but the tokenizer "
                      f"maps {INSTRUCTION_END!r} to {colon}; {hint}")
  if tuple(sorted(skip_token_ids)) != punctuation:
    raise ConfigError(f"config.model.skip_token_ids do not match the tokenizer's punctuation ids "
                      f"{punctuation}; {hint}")

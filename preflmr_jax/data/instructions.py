"""The published PreFLMR instruction templates, per task type.

Training draws one at random per example (the official M2KR training configs' `add_instruction`
lists); evaluation uses the dataset's own `instruction` column. Tasks without a list (CC3M, MSMARCO,
IGLUE, and our SAMPLE) keep their dataset's instruction in training too, as the official configs do.
Infoseek is in none of the published training lists; it gets the VQA list, its task type.
The lists are copied as published, duplicates and trailing spaces included: a duplicate doubles that
template's probability, and `QueryTokenizer` strips the trailing space.
"""

from __future__ import annotations

from typing import Optional

VQA = (
    "Using the provided image, obtain documents that address the subsequent question: ",
    "Retrieve documents that provide an answer to the question alongside the image: ",
    "Extract documents linked to the question provided in conjunction with the image: ",
    "Utilizing the given image, obtain documents that respond to the following question: ",
    "Using the given image, access documents that provide insights into the following question: ",
    "Obtain documents that correspond to the inquiry alongside the provided image: ",
    "With the provided image, gather documents that offer a solution to the question: ",
    "Utilizing the given image, obtain documents that respond to the following question: ",
)
CAPTION = (
    "Provide a brief description of the image along with the following question:",
    "Provide a concise explanation of the image along with the following question:",
)
IMAGE_TO_DOCUMENT = (
    "Identify the document that is connected to this image.:",
    "Provide information about the document linked to this image.:",
    "Please describe the document that corresponds to this image.:",
    "What is the document that this image is related to?:",
    "Could you elucidate the document associated with this image?:",
    "Describe the document that accompanies this image.:",
    "Please give information on the document that goes with this image.:",
    "What document is represented by this image?:",
    "Identify the document that this image pertains to.:",
)

# Task type by (canonical) M2KR task name; absent: the dataset's own instruction.
TASK_TYPES = {
    "OVEN": VQA, "KVQA": VQA, "OKVQA": VQA, "E-VQA": VQA, "Infoseek": VQA,
    "LLaVA": CAPTION,
    "WIT": IMAGE_TO_DOCUMENT,
}


# By the type a user's task declares (`tasks.TYPES`); "text": the dataset's own instruction.
BY_TYPE = {"vqa": VQA, "caption": CAPTION, "image_to_document": IMAGE_TO_DOCUMENT, "text": None}


def training_instructions(task: str, task_type: Optional[str] = None
                          ) -> Optional[tuple[str, ...]]:
  """The templates a training example of `task` draws from; None: use the record's own. A user's
  task (`task_type` given) draws its type's list."""
  return BY_TYPE[task_type] if task_type is not None else TASK_TYPES.get(task)

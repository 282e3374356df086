"""Prompt data: synthetic verifiable tasks, JSONL prompts, grain pipelines."""

from opdjax.data.pipeline import (
    PromptSet,
    PromptSource,
    Record,
    batches,
    encode,
    load_jsonl,
    stream,
    synthetic_records,
)
from opdjax.data.tasks import step_credit, verify
from opdjax.data.tokenizer import char_tokenizer

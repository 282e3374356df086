"""Prompt data: synthetic verifiable tasks, JSONL prompts, grain pipelines."""

from opdjax.data.pipeline import PromptSet
from opdjax.data.pipeline import PromptSource
from opdjax.data.pipeline import Record
from opdjax.data.pipeline import batches
from opdjax.data.pipeline import encode
from opdjax.data.pipeline import load_jsonl
from opdjax.data.pipeline import synthetic_records
from opdjax.data.tasks import verify
from opdjax.data.tokenizer import char_tokenizer

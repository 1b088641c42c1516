"""A frozen teacher for distillation and teacher-entropy masking: any local masked-LM folder
(e.g. a masklab run's `hf_model/`) whose vocabulary is the student's."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoModelForMaskedLM, AutoTokenizer, PreTrainedModel

from core.errors import ConfigError


def load_teacher(path: str | None, student_tokens: list[str], key: str) -> PreTrainedModel:
    """Load, freeze and check the teacher; `key` names the config key in errors."""
    folder = Path(path) if path else None
    if folder is None or not (folder / "config.json").is_file():
        raise ConfigError(f"{key}: {path!r} is not a saved transformers model folder (no config.json)")
    teacher = AutoModelForMaskedLM.from_pretrained(folder, local_files_only=True).eval().requires_grad_(False)
    if teacher.config.vocab_size != len(student_tokens):
        raise ConfigError(
            f"{key}: the teacher's vocabulary has {teacher.config.vocab_size} tokens, the student's "
            f"{len(student_tokens)}"
        )
    if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
        teacher_tokens = AutoTokenizer.from_pretrained(folder, local_files_only=True).convert_ids_to_tokens(
            list(range(len(student_tokens)))
        )
        differing = [i for i, (s, t) in enumerate(zip(student_tokens, teacher_tokens)) if s and s != t]
        if differing:
            first = differing[0]
            raise ConfigError(
                f"{key}: the teacher's tokenizer differs from the student's at {len(differing)} of "
                f"{len(student_tokens)} ids (first: id {first}, {teacher_tokens[first]!r} vs {student_tokens[first]!r})"
            )
    return teacher

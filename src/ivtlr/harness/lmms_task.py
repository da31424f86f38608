"""The lmms-eval task class of the YAMLs under ``integrations/lmms_eval``: ``ivtlr eval``'s questions, loaded by ivtlr.

A task YAML names this class (``class: !function ivtlr.harness.lmms_task.IvtlrQuestionsTask``) and says which
questions to ask the way an ivtlr config does: ``dataset_path`` is the source (``digits``, ``m3cot``, a hub id,
``auto``...), ``test_split`` the split, ``dataset_kwargs`` the rest of a ``dataset`` section (``data_files``,
``use_context``, ``keep_no_image``, ``limit``); or ``dataset_kwargs: {config: RUN.yaml}`` asks the questions of
``ivtlr eval RUN.yaml`` with its ``eval.max_new_tokens``. The documents come from :func:`question_docs` (so the
bundled digit puzzles are written locally on first use, never downloaded), the same way lmms-eval's own
python-class tasks fill ``self.dataset``.

The class is a messages (chat) task, the kind lmms-eval builds for chat models such as its built-in ``openai``
model, which is what talks to ``ivtlr serve``.
"""
from __future__ import annotations

import logging
from typing import Any

import datasets
from lmms_eval.api.task import ConfigurableMessagesTask

from ivtlr.harness.questions import question_docs, task_config

logger = logging.getLogger(__name__)


class IvtlrQuestionsTask(ConfigurableMessagesTask):
    def __init__(self, *args: Any, config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if config is not None:
            config = {key: value for key, value in config.items() if key != "class"}
        super().__init__(*args, config=config, **kwargs)

    def download(self, dataset_kwargs: dict[str, Any] | None = None) -> None:
        split = self.config.test_split
        if not split:
            raise ValueError(f"task {self.config.task}: set test_split (the split whose questions are asked)")
        options = dict(dataset_kwargs or {})
        config = task_config(self.config.dataset_path, split, options)
        if "config" in options:
            self.config.generation_kwargs = {**(self.config.generation_kwargs or {}),
                                             "max_new_tokens": config.eval.max_new_tokens}
            if config.eval.n_latent is not None:
                logger.warning("%s sets eval.n_latent=%d, which the lmms-eval openai model cannot send: the server "
                               "answers with the checkpoint's trained number of latent steps", options["config"],
                               config.eval.n_latent)
        docs = question_docs(config)
        self.dataset = datasets.DatasetDict({split: docs})
        if self.config.process_docs is not None:
            self.dataset[split] = self.config.process_docs(self.dataset[split])
        self.dataset_no_image = datasets.DatasetDict({split: self.dataset[split].remove_columns("image")})
        logger.info("%s: %d questions of %s split %s", self.config.task, len(docs), config.dataset.source,
                    config.dataset.eval_split)

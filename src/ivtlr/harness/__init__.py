"""Evaluation harnesses that ask a served model (``ivtlr serve``) the questions ``ivtlr eval`` answers.

:mod:`ivtlr.harness.questions` turns an ivtlr dataset section into harness documents and scores answers with ivtlr's
own rules; :mod:`ivtlr.harness.lmms_task` is the lmms-eval task class the YAMLs under ``integrations/lmms_eval`` name
(it imports lmms-eval, which only a harness run has installed). See docs/harnesses.md.
"""

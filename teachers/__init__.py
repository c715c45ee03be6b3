"""BERT teachers: loading, freezing, adaptation to MLM."""

from teachers.teacher import Teacher, TeacherError, load_bert_mlm

__all__ = ["Teacher", "TeacherError", "load_bert_mlm"]

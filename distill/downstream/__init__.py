"""Downstream work on distilled students: classification tasks, fine-tuning (optionally with task-specific
distillation) and the teacher-vs-student report. Built on distill's mechanics; nothing in distill's
training core imports from here."""

"""Hub-ready exports: model card, dtype, model_max_length, the push (offline, up to the upload call), and
transformers' own Trainer on our export."""

import json

import pytest
import torch
import transformers

from distill import hub
from distill.recipes import HubConfig, RecipeError
from tests.cli import TINY, kit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def export(tiny_teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("hub") / "run"
    proc = kit(TINY, f"teacher.name_or_path={tiny_teacher_dir}", f"output_dir={out}", "train.max_steps=3",
               "train.eval_every=3", "hub.license=apache-2.0")
    return out / "student", json.loads(proc.stdout)


def test_export_has_a_model_card_with_the_runs_numbers(export, tiny_teacher_dir):
    path, summary = export
    card = (path / "README.md").read_text()
    assert card.startswith("---\n") and "pipeline_tag: fill-mask" in card and "license: apache-2.0" in card
    assert "library_name: transformers" in card and "knowledge-distillation" in card
    assert str(tiny_teacher_dir) in card  # the teacher
    student, teacher = summary["student"], summary["teacher"]
    assert f"{100 * student['mlm_accuracy']:.1f} %" in card and f"{100 * teacher['mlm_accuracy']:.1f} %" in card
    assert "3 (batch 8 × accumulation 1)" in card and "max_steps: 3" in card  # steps and the recipe


def test_export_config_has_dtype_and_the_tokenizer_the_models_positions(export):
    path, _ = export
    config = json.loads((path / "config.json").read_text())
    assert config["dtype"] == "float32" and config["max_position_embeddings"] == 128
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert tok.model_max_length == 128
    model = transformers.AutoModelForMaskedLM.from_pretrained(path)
    assert model.dtype == torch.float32
    fill = transformers.pipeline("fill-mask", model=str(path), tokenizer=str(path), device="cpu")
    # longer than the model's 128 positions: truncated to them (the [MASK] comes first, so it survives), no crash
    first = "[MASK] is the capital of france. " + "the river runs through the old town and " * 60
    assert len(tok(first)["input_ids"]) > 128
    assert len(fill(first, tokenizer_kwargs={"truncation": True})) == 5


def test_push_uploads_the_export_up_to_the_hub_call(export, monkeypatch):
    path, _ = export
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw["repo_id"], kw))

            class Info:
                commit_url = "https://huggingface.co/me/student/commit/abc"
            return Info()

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    assert hub.push(path, HubConfig(), "m") is None and calls == []
    url = hub.push(path, HubConfig(push_to_hub=True, repo_id="me/student"), "distilled")
    assert url.endswith("/commit/abc")
    (create, upload) = calls
    assert create[1] == "me/student" and create[2]["private"] is True and create[2]["exist_ok"] is True
    assert upload[2]["folder_path"] == str(path) and upload[2]["commit_message"] == "distilled"
    assert "wandb/**" in upload[2]["ignore_patterns"]


def test_push_is_checked_before_any_work(monkeypatch):
    with pytest.raises(RecipeError, match="hub.repo_id must be 'owner/name'"):
        HubConfig(push_to_hub=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set"):
        hub.check_push(HubConfig(push_to_hub=True, repo_id="me/x"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(ValueError, match="needs a Hugging Face token"):
        hub.check_push(HubConfig(push_to_hub=True, repo_id="me/x"))


def test_transformers_trainer_trains_our_export(export, tmp_path):
    path, _ = export
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    texts = ["a good film", "a bad film", "great acting", "terrible plot"] * 4
    data = [dict(tok(t), labels=i % 2) for i, t in enumerate(texts)]
    before = model.classifier.weight.detach().clone()
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=3,
                                          per_device_train_batch_size=4, report_to=[], use_cpu=True,
                                          logging_steps=1, save_strategy="no")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   data_collator=transformers.DataCollatorWithPadding(tok))
    out = trainer.train()
    assert out.global_step == 3 and torch.isfinite(torch.tensor(out.training_loss))
    assert not torch.equal(before, model.classifier.weight)

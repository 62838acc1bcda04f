"""Scoring against hand-computed values: Arabic normalization, WER/CER, ROUGE, macro-F1, CLI."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from engine.arabic_text import ArabicRougeTokenizer, normalize_arabic
from engine.evaluate import main, metrics_markdown, read_prediction_file
from engine.scoring import INVALID_COLUMN, score

REPO_ROOT = Path(__file__).resolve().parents[2]
DIALECTS = ["egy", "glf", "lev", "msa", "nor"]


# --- normalization, one rule per case

@pytest.mark.parametrize("raw, expected", [
    ("ذَهَبَ", "ذهب"),                       # harakat
    ("كتابًا", "كتابا"),                     # tanwin fathatan
    ("مُحَمَّدٌ", "محمد"),                    # shadda, damma, tanwin dammatan
    ("قَلْب", "قلب"),                       # sukun
    ("هٰذا", "هذا"),                         # superscript (dagger) alef
    ("صلى الله عليه\u0610", "صلي الله عليه"),  # Quranic honorific mark; ى -> ي
    ("جمـــيل", "جميل"),                     # tatweel
    ("أحمد إسلام آمن ٱلعلم", "احمد اسلام امن العلم"),  # alef forms
    ("سؤال مسئول", "سوال مسيول"),            # hamza carriers
    ("سماء", "سماء"),                        # standalone hamza is kept
    ("على مستشفى", "علي مستشفي"),            # alef maqsura -> ya
    ("٠١٢٣٤٥٦٧٨٩ ۰۱۲۳۴۵۶۷۸۹", "0123456789 0123456789"),  # both Arabic-Indic digit sets
    ("نعم، لا؛ لماذا؟", "نعم لا لماذا"),      # Arabic punctuation
    ("«قال» (مرحبا)! - حسنا...", "قال مرحبا حسنا"),  # Unicode and ASCII punctuation
    ("كلمة،كلمة", "كلمة كلمة"),              # punctuation splits, it does not glue words
    ("  ذهب \t\n الولد  ", "ذهب الولد"),      # whitespace collapsed
    ("Hello WORLD عربي", "hello world عربي"),  # Latin lowercased
    ("\ufefbكن", "لاكن"),                    # presentation-form lam-alef ligature
    ("كل\u200cمة", "كلمة"),                  # zero-width non-joiner removed
])
def test_normalize_arabic_applies_each_rule(raw, expected):
    assert normalize_arabic(raw) == expected


def test_taa_marbuta_is_kept_by_default_and_mapped_to_ha_on_request():
    assert normalize_arabic("مدرسة جميلة") == "مدرسة جميلة"
    assert normalize_arabic("مدرسة جميلة", taa_marbuta="to_ha") == "مدرسه جميله"
    with pytest.raises(ValueError, match="taa_marbuta"):
        normalize_arabic("مدرسة", taa_marbuta="drop")


def test_normalize_arabic_is_idempotent():
    text = "قَالَ أَحْمَدُ: «القُرْآنُ ٣ مَرَّات» — مُسْتَشْفَى، سُؤَالٌ؟"
    once = normalize_arabic(text)
    assert normalize_arabic(once) == once
    assert normalize_arabic(once, taa_marbuta="to_ha") == normalize_arabic(text, taa_marbuta="to_ha")


def test_arabic_rouge_tokenizer_keeps_arabic_words_that_the_default_drops():
    # The trap this tokenizer exists for: rouge-score's default scores Arabic as 0.
    default = rouge_scorer.RougeScorer(["rouge1"])
    assert default.score("ذهب الولد", "ذهب الولد")["rouge1"].fmeasure == 0.0
    assert ArabicRougeTokenizer().tokenize("ذَهَبَ الوَلَدُ، إلى") == ["ذهب", "الولد", "الي"]


# --- asr

# Reference with full diacritics and hamza-below alef; prediction bare, alef maqsura as written.
DIACRITIZED_REFERENCE = "ذَهَبَ الوَلَدُ إِلَى المَدْرَسَةِ"
BARE_PREDICTION = "ذهب الولد الى المدرسة"


def test_wer_cer_of_diacritized_reference_normalized_and_raw():
    # Normalized, both sides read "ذهب الولد الي المدرسة": WER 0, CER 0.
    # Raw, every one of the 4 words differs (diacritics, إ): WER 4/4 = 1.
    # Raw CER: the reference has 34 characters (3 spaces + 6 + 8 + 5 + 12 letters/marks),
    # of which 13 are diacritics (3 + 3 + 2 + 5) -> 13 deletions, plus إ -> ا, 1 substitution:
    # 14 / 34. No shorter edit exists: 13 are needed for the length gap and إ matches nothing.
    assert len(DIACRITIZED_REFERENCE) == 34 and len(BARE_PREDICTION) == 21
    metrics = score("asr", [BARE_PREDICTION], [DIACRITIZED_REFERENCE])
    assert metrics["wer"] == 0.0 and metrics["cer"] == 0.0
    assert metrics["wer_raw"] == 1.0
    assert metrics["cer_raw"] == pytest.approx(14 / 34)
    assert metrics["n"] == 1


def test_wer_cer_of_alef_variants_with_one_real_error():
    # Reference "أحمد قرأ القرآن", prediction "احمد قرا الكتاب".
    # Normalized: "احمد قرا القران" vs "احمد قرا الكتاب": only the last word differs ->
    # WER 1/3. Characters: 15 each; "القران" vs "الكتاب" differ in ق/ك, ر/ت, ن/ب -> CER 3/15.
    # Raw: all three words differ (أ, أ, آ) -> WER 3/3; characters: أ/ا, أ/ا, then ق/ك, ر/ت,
    # آ/ا, ن/ب -> CER 6/15.
    metrics = score("asr", ["احمد قرا الكتاب"], ["أحمد قرأ القرآن"])
    assert metrics["wer"] == pytest.approx(1 / 3)
    assert metrics["cer"] == pytest.approx(3 / 15)
    assert metrics["wer_raw"] == 1.0
    assert metrics["cer_raw"] == pytest.approx(6 / 15)
    assert (metrics["substitutions"], metrics["deletions"], metrics["insertions"]) == (1, 0, 0)


def test_wer_is_corpus_level_over_all_pairs():
    # Errors are summed before dividing: (0 + 1) / (4 + 3) words, (0 + 3) / (21 + 15) characters
    # (the normalized diacritized reference has 21 characters), not a mean of per-pair rates.
    metrics = score("asr", [BARE_PREDICTION, "احمد قرا الكتاب"],
                    [DIACRITIZED_REFERENCE, "أحمد قرأ القرآن"])
    assert metrics["wer"] == pytest.approx(1 / 7)
    assert metrics["cer"] == pytest.approx(3 / 36)
    assert metrics["wer_raw"] == pytest.approx(7 / 7)


def test_digits_punctuation_and_taa_marbuta_option_in_wer():
    # "٣" vs "3" and a trailing "،" disappear in normalization; raw they cost 1 of 3 words
    # ("٣"≠"3") and "كتب،"≠"كتب": 2/3.
    metrics = score("asr", ["عندي 3 كتب"], ["عندي ٣ كتب،"])
    assert metrics["wer"] == 0.0 and metrics["wer_raw"] == pytest.approx(2 / 3)
    # ة vs ه: a substitution unless the option maps ة to ه.
    assert score("asr", ["مدرسه"], ["مدرسة"])["wer"] == 1.0
    assert score("asr", ["مدرسه"], ["مدرسة"], taa_marbuta="to_ha")["wer"] == 0.0


def test_empty_prediction_deletes_every_reference_word():
    # "ذهب الولد": 2 words, 9 characters (3 + space + 5), all deleted.
    metrics = score("asr", [""], ["ذهب الولد"])
    assert metrics["wer"] == 1.0 and metrics["cer"] == 1.0
    assert metrics["deletions"] == 2 and metrics["n_empty_prediction"] == 1


def test_empty_reference_counts_predicted_words_as_insertions():
    # Pair 1: empty reference, 2 predicted words -> 2 insertions. Pair 2: "قرأ الولد" vs
    # "قرا الولد" equal after normalization. WER = 2 insertions / 2 reference words = 1.
    metrics = score("asr", ["ذهب الولد", "قرا الولد"], ["", "قرأ الولد"])
    assert metrics["insertions"] == 2 and metrics["reference_words"] == 2
    assert metrics["wer"] == 1.0 and metrics["n_empty_reference"] == 1
    # No reference words at all: the denominator is 1, so WER = number of inserted words.
    assert score("asr", ["ذهب الولد"], [""])["wer"] == 2.0


def test_all_empty_is_perfect_and_no_pairs_gives_none():
    metrics = score("asr", ["", "  "], ["", "،"])
    assert metrics["wer"] == 0.0 and metrics["cer"] == 0.0
    assert score("asr", [], [])["wer"] is None
    assert score("did", [], [], labels=DIALECTS)["macro_f1"] is None


# --- sum

def test_rouge_of_arabic_summaries_equals_hand_count():
    # Normalized reference: ذهب الولد الي المدرسة صباحا (5 words);
    # prediction: ذهب الولد الي البيت (4 words).
    # ROUGE-1: 3 shared words -> P 3/4, R 3/5, F = 2·(3/4)(3/5)/(3/4+3/5) = 2/3.
    # ROUGE-2: shared bigrams "ذهب الولد", "الولد الي" -> P 2/3, R 2/4, F = 4/7.
    # ROUGE-L: longest common subsequence ذهب الولد الي = 3 words -> 2/3.
    metrics = score("sum", ["ذهب الولد الى البيت"], ["ذَهَبَ الولد إلى المدرسة صباحا"])
    assert metrics["rouge1"] == pytest.approx(2 / 3)
    assert metrics["rouge2"] == pytest.approx(4 / 7)
    assert metrics["rougeL"] == pytest.approx(2 / 3)


def test_rouge_with_empty_sides_is_defined_and_averaged_over_pairs():
    # Both empty: equal -> 1. One side empty: 0. Mean over the two pairs: 0.5.
    metrics = score("sum", ["", "ذهب"], ["", ""])
    assert metrics["rouge1"] == 0.5 and metrics["rougeL"] == 0.5
    assert metrics["n_empty_reference"] == 2 and metrics["n_empty_prediction"] == 1


# --- did / ser

def test_macro_f1_with_an_invalid_answer():
    # refs:  egy   egy               lev  msa  glf
    # preds: EGY.  "i think egyptian" lev  lev  glf  -> normalized "egy", <invalid>, lev, lev, glf
    # egy: TP 1, predicted 1, support 2 -> P 1, R 1/2, F1 2/3
    # lev: TP 1, predicted 2, support 1 -> P 1/2, R 1, F1 2/3
    # msa: TP 0, support 1 -> F1 0;  glf: F1 1;  nor: in neither refs nor preds -> left out.
    # macro-F1 = (2/3 + 2/3 + 0 + 1) / 4 = 7/12 (it would be 7/15 if nor counted).
    metrics = score("did", ["EGY.", "i think egyptian", "lev", "lev", "glf"],
                    ["egy", "egy", "lev", "msa", "glf"], labels=DIALECTS)
    assert metrics["macro_f1"] == pytest.approx(7 / 12)
    assert metrics["macro_f1_labels"] == ["egy", "glf", "lev", "msa"]
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["invalid_rate"] == pytest.approx(1 / 5) and metrics["n_invalid"] == 1
    confusion = metrics["confusion"]
    assert confusion["columns"] == DIALECTS + [INVALID_COLUMN]
    egy_row = confusion["matrix"][confusion["rows"].index("egy")]
    assert egy_row == [1, 0, 0, 0, 0, 1]
    msa_row = confusion["matrix"][confusion["rows"].index("msa")]
    assert msa_row[confusion["columns"].index("lev")] == 1
    assert sum(map(sum, confusion["matrix"])) == 5


def test_empty_prediction_is_invalid_and_unknown_reference_is_counted_not_scored():
    metrics = score("ser", ["", "happy", "sad"], ["sad", "joyful", "sad"],
                    labels=["neutral", "happy", "sad", "angry"])
    assert metrics["n"] == 3 and metrics["n_scored"] == 2
    assert metrics["n_unknown_reference"] == 1 and metrics["unknown_references"] == ["joyful"]
    # Scored pairs: sad->"" (invalid), sad->sad. sad: P 1/1, R 1/2 -> F1 2/3; only label in play.
    assert metrics["accuracy"] == 0.5 and metrics["invalid_rate"] == 0.5
    assert metrics["n_empty_prediction"] == 1
    assert metrics["macro_f1"] == pytest.approx(2 / 3)


def test_label_tasks_need_a_usable_label_set():
    with pytest.raises(ValueError, match="label set"):
        score("did", ["egy"], ["egy"])
    with pytest.raises(ValueError, match="same after normalization"):
        score("did", ["egy"], ["egy"], labels=["EGY", "egy"])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        score("asr", ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="unknown task"):
        score("qa", ["a"], ["a"])


def test_metrics_markdown_has_a_table_per_task_and_the_confusion_matrix():
    text = metrics_markdown({
        "asr": score("asr", ["ذهب"], ["ذهب"]),
        "did": score("did", ["egy", "x"], ["egy", "lev"], labels=DIALECTS),
    })
    assert "## asr" in text and "| wer | 0.0000 |" in text
    assert "## did" in text and f"| reference | egy | glf | lev | msa | nor | {INVALID_COLUMN} |" in text
    assert "| lev | 0 | 0 | 0 | 0 | 0 | 1 |" in text


# --- command line

def _write_lines(path: Path, rows: list) -> Path:
    path.write_text("\n".join(row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)
                              for row in rows) + "\n", encoding="utf-8")
    return path


def test_cli_scores_a_predictions_file(tmp_path):
    path = _write_lines(tmp_path / "predictions.jsonl", [
        {"task": "asr", "prediction": "احمد قرا الكتاب", "reference": "أحمد قرأ القرآن"},
        {"task": "sum", "prediction": "ذهب الولد الى البيت",
         "reference": "ذَهَبَ الولد إلى المدرسة صباحا"},
        {"task": "did", "prediction": "najdi", "reference": "najdi"},
        {"task": "did", "prediction": "egy", "reference": "hijazi"},
        {"task": "ser", "prediction": "ANGRY", "reference": "angry"},
        "",  # a blank line is allowed
    ])
    completed = subprocess.run(
        [sys.executable, "-m", "engine.evaluate", "--predictions", str(path),
         "--dialects", "najdi", "hijazi"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    metrics = json.loads(completed.stdout)
    assert list(metrics) == ["asr", "sum", "did", "ser"]
    assert metrics["asr"]["wer"] == pytest.approx(1 / 3)
    assert metrics["sum"]["rouge1"] == pytest.approx(2 / 3)
    # "egy" is not in the custom dialect set -> invalid; ser uses the default emotions.
    assert metrics["did"]["accuracy"] == 0.5 and metrics["did"]["invalid_rate"] == 0.5
    assert metrics["ser"]["accuracy"] == 1.0 and metrics["ser"]["n"] == 1


def test_cli_malformed_line_names_its_line_number(tmp_path):
    path = _write_lines(tmp_path / "bad.jsonl", [
        {"task": "asr", "prediction": "ذهب", "reference": "ذهب"},
        '{"task": "asr", "prediction": "ذهب", ',
    ])
    completed = subprocess.run(
        [sys.executable, "-m", "engine.evaluate", "--predictions", str(path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert f"{path}:2: not valid JSON" in completed.stderr
    assert completed.stdout == ""


@pytest.mark.parametrize("line, message", [
    ({"task": "asr", "prediction": "x"}, ":1: missing field(s) reference"),
    ({"task": "ocr", "prediction": "x", "reference": "x"}, ":1: unknown task 'ocr'"),
    ({"task": "asr", "prediction": None, "reference": "x"}, ":1: field 'prediction' must be a string"),
    (["asr", "x", "x"], ":1: expected a JSON object"),
])
def test_cli_reports_each_kind_of_bad_line(tmp_path, capsys, line, message):
    path = _write_lines(tmp_path / "bad.jsonl", [line])
    assert main(["--predictions", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_cli_warns_about_references_outside_the_label_set(tmp_path, capsys):
    path = _write_lines(tmp_path / "p.jsonl",
                        [{"task": "did", "prediction": "najdi", "reference": "najdi"}])
    assert main(["--predictions", str(path)]) == 0
    captured = capsys.readouterr()
    assert "not in the label set" in captured.err and "--dialects" in captured.err
    assert json.loads(captured.out)["did"]["n_unknown_reference"] == 1


def test_missing_or_empty_predictions_file_is_a_clear_error(tmp_path, capsys):
    assert main(["--predictions", str(tmp_path / "absent.jsonl")]) == 2
    assert "no such predictions file" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("\n")
    assert main(["--predictions", str(tmp_path / "empty.jsonl")]) == 2
    assert "no prediction lines" in capsys.readouterr().err


def test_read_prediction_file_keeps_line_numbers(tmp_path):
    path = _write_lines(tmp_path / "p.jsonl", [
        "", {"task": "ser", "prediction": "sad", "reference": "happy"}])
    [record] = read_prediction_file(path)
    assert (record.task, record.prediction, record.reference, record.line_number) == (
        "ser", "sad", "happy", 2)

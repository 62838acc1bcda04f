"""The log line a user watches: every number of the metrics row it promises, ADS's embedding hit
rate only when ADS draws (fallback projections are otherwise invisible in the console)."""
from engine.metrics import format_line

ROW = {"step": 40, "loss": 4.10214, "loss_per_task": {"asr": 4.31, "sum": 4.02}, "lr": 1.99e-3, "grad_norm": 0.812,
       "tokens_per_sec": 1875.4, "mfu": None, "mem_gib": 0.97, "data_wait_pct": 1.3, "stage": "asr", "eta_s": 190.0}


def test_the_line_shows_the_row():
    line = format_line(ROW, 150)
    assert line == ("step 40/150 | loss 4.1021 (asr 4.310 sum 4.020) | lr 1.99e-03 | gnorm 0.812 | tok/s 1,875 | "
                    "mfu n/a | mem 0.97 GiB | data 1.3% | stage asr | eta 3m10s")


def test_an_ads_row_shows_its_embedding_hit_rate():
    assert "emb hit" not in format_line({**ROW, "embedding_hit_rate": None}, 150)
    line = format_line({**ROW, "stage": "ads", "embedding_hit_rate": 0.0, "mfu": 0.412}, 150)
    assert "| mfu 41.2% |" in line and "| stage ads | emb hit 0% | eta" in line

"""Fine-tune variants (FinetuneSettings fields as JSON) at K corrected objects: GCA-ResUNet starter → MoNuSeg
image TCGA-G9-6362, scored on 6 other MoNuSeg and 12 DSB2018 validation images (the table in the README).

Usage: python resources/figures/finetune_variants.py gca_resunet '{"name": {"lr": 0.0003}}' 30
"""
import json, sys, time, numpy as np, torch
torch.set_num_threads(1)
from src_models import load_weights
from napari_medseg.core.pipeline import load_model
from napari_medseg.core.datasets import load_folder
from napari_medseg.core.validation import predict_instances, evaluate_samples
from napari_medseg.core.bench_finetune import correct_worst
from napari_medseg.core.finetune import finetune_job, FinetuneSettings
from napari_medseg.core.progress import drain
model_name = sys.argv[1]; variants = json.loads(sys.argv[2]); K = int(sys.argv[3]) if len(sys.argv) > 3 else 30
model, card = load_model(model_name, device="cpu")
new = load_folder("../shared/data/monuseg2018_train")
target = next(s for s in new if s.id == "TCGA-G9-6362-01Z-00-DX1")
scored = [s for s in new if s.id != target.id][:6]
ids = set(card["training"]["val_ids"]); orig = [s for s in load_folder("../shared/data/dsb2018_train") if s.id in ids][:12]
def score(m, c, ss):
    r = evaluate_samples(m.eval(), ss, card=c)["mean"]; return round(r["aji"], 4), round(r["f1"], 4)
print("before", score(model, card, scored), score(model, card, orig), flush=True)
predicted = predict_instances(model.eval(), target.image, card)
corrected, counts = correct_worst(predicted, target.labels, K)
for name, kw in variants.items():
    t = time.time()
    r = drain(finetune_job(card["weights_path"], np.moveaxis(target.image, 0, -1), corrected, predicted,
                           settings=FinetuneSettings(**kw), out=f"finetune_variants/{name}_k{K}"))
    sec = time.time() - t
    child, cc = load_weights(f"finetune_variants/{name}_k{K}", "cpu")
    print(name, kw, "steps", r.steps, r.stopped, f"{sec:.0f}s", "new", score(child, cc, scored), "orig", score(child, cc, orig), flush=True)

"""ALM default (merge_by_space_prob+append_space) vs naive on one real Dolly batch (4 x 256).

Run from the repository root: python results/alm-debias/probe.py (output: results/alm-debias/output.txt).
"""

import torch

from ctkd_bench import zoo
from ctkd_bench.alignment import TokenizerPair, build_pair_artifacts
from ctkd_bench.api import MethodContext, get_method
from ctkd_bench.data.batch import collate
from ctkd_bench.data.encode import PairEncoder
from ctkd_bench.data.sources import load_examples
from ctkd_bench.models import teacher_forward

t_spec, s_spec = zoo.parse_pair("gemma3-270m:smollm2-135m")
s_tok, t_tok = zoo.load_tokenizer(s_spec), zoo.load_tokenizer(t_spec)
arts = build_pair_artifacts({"spans", "word_starts"}, TokenizerPair(s_tok, t_tok, zoo.cache_dir()))
enc = PairEncoder(s_tok, t_tok, max_prompt_tokens=128, max_length=256, artifacts=arts)
encoded = [
    x
    for x in (enc.encode(e) for e in load_examples("dolly", "train", "../shared/data")[:12])
    if x is not None
][:4]
batch = collate(encoded, student_pad_id=s_tok.pad_token_id, teacher_pad_id=t_tok.pad_token_id)
student, teacher = zoo.load_model(s_spec), zoo.load_model(t_spec)
cls = get_method("alm")
with torch.no_grad():
    s_out = student(input_ids=batch.student.input_ids, attention_mask=batch.student.attention_mask).logits
    from ctkd_bench.api import ModelOutputs

    naive_cfg = cls.Config(merge_by_space_prob=False, append_space=False)
    needs = cls.needs(cls.Config())
    t = teacher_forward(teacher, batch, needs, zoo.vocab_size(t_tok))
    so = ModelOutputs(s_out, None, None, None, s_out.shape[-1])
    ctx = MethodContext(None, None, s_tok, t_tok, None, False, alignment=arts)
for name, cfg in [
    ("default", cls.Config()),
    ("no-merge", cls.Config(merge_by_space_prob=False)),
    ("naive", naive_cfg),
]:
    m = cls(cfg, ctx)
    kd = m(batch, so, t)["kd"].item()
    print(f"{name:9s} kd={kd:.5f}")
# chunk / group counts
mod = __import__(type(cls(cls.Config(), ctx)).__module__, fromlist=["x"])
s0, s1, t0, t1, valid = mod.chunk_table(batch, True)
_, tsp = mod.teacher_token_logprobs(t, batch.teacher.input_ids, t0, t1, valid, arts["word_starts"].teacher)
tsp = tsp.gather(1, (t1 - 1).clamp(min=0, max=tsp.shape[1] - 1))
ends = valid & (tsp.exp() > 0.1)
print(
    "chunks",
    int(valid.sum()),
    "groups",
    int(ends.sum()) + int((valid & ~ends).any(1).sum()),
    "mean teacher P(word start) after a chunk",
    float(tsp.exp()[valid].mean()),
)

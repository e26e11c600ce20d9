"""Writes the parameter sets of benchmarks/shapes/ that need no model code.

    python -m benchmarks.shapes.generate

faster_rcnn_r50_fpn.json and mask_rcnn_r50_fpn.json were read off torchvision
0.29.2's models (their "model" field says how); BERT-large follows the layout of
Hugging Face's BertForPreTraining (the decoder weight is tied to the word
embeddings, so it is not a second tensor); many_small is 2,000 tensors of
1 to 10,000 elements drawn with a fixed seed, to expose per-tensor overheads.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent


def bert_large():
    hidden, ffn, vocab, layers = 1024, 4096, 30522, 24
    ps = [("bert.embeddings.word_embeddings.weight", [vocab, hidden]),
          ("bert.embeddings.position_embeddings.weight", [512, hidden]),
          ("bert.embeddings.token_type_embeddings.weight", [2, hidden]),
          ("bert.embeddings.LayerNorm.weight", [hidden]), ("bert.embeddings.LayerNorm.bias", [hidden])]  # fmt: skip
    for i in range(layers):
        pre = f"bert.encoder.layer.{i}"
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            ps += [(f"{pre}.{name}.weight", [hidden, hidden]), (f"{pre}.{name}.bias", [hidden])]
        ps += [(f"{pre}.attention.output.LayerNorm.weight", [hidden]), (f"{pre}.attention.output.LayerNorm.bias", [hidden]),
               (f"{pre}.intermediate.dense.weight", [ffn, hidden]), (f"{pre}.intermediate.dense.bias", [ffn]),
               (f"{pre}.output.dense.weight", [hidden, ffn]), (f"{pre}.output.dense.bias", [hidden]),
               (f"{pre}.output.LayerNorm.weight", [hidden]), (f"{pre}.output.LayerNorm.bias", [hidden])]  # fmt: skip
    ps += [("bert.pooler.dense.weight", [hidden, hidden]), ("bert.pooler.dense.bias", [hidden]),
           ("cls.predictions.bias", [vocab]),
           ("cls.predictions.transform.dense.weight", [hidden, hidden]), ("cls.predictions.transform.dense.bias", [hidden]),
           ("cls.predictions.transform.LayerNorm.weight", [hidden]), ("cls.predictions.transform.LayerNorm.bias", [hidden]),
           ("cls.seq_relationship.weight", [2, hidden]), ("cls.seq_relationship.bias", [2])]  # fmt: skip
    return "BertForPreTraining, bert-large-uncased layout (decoder weight tied to the word embeddings)", ps


def many_small():
    rng = random.Random(0)
    return "2,000 tensors of 1 to 10,000 elements, random.Random(0)", [
        (f"t{i}", [rng.randint(1, 10_000)]) for i in range(2000)
    ]


def write(name, model, params, note=""):
    numel = 0
    for _, shape in params:
        n = 1
        for d in shape:
            n *= d
        numel += n
    head = {"model": model, "note": note, "num_tensors": len(params), "num_params": numel}
    lines = ["{"] + [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()] + ['  "params": [']
    lines += [f'    {json.dumps({"name": n, "shape": s})},' for n, s in params]
    lines[-1] = lines[-1].rstrip(",")
    (HERE / f"{name}.json").write_text("\n".join(lines + ["  ]", "}"]) + "\n")
    print(name, len(params), numel)


if __name__ == "__main__":
    write("bert_large", *bert_large())
    write("many_small", *many_small())

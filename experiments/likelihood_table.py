"""Build the likelihood table: our evaluated runs (figures A, B, C from `evaluation.json`) next to the
published test bits/dim of the reference models, each marked with its source and how far to trust it.

    make tables RUNS="runs/prior_demo runs/prior_cifar10"
    .venv/bin/python experiments/likelihood_table.py runs/prior_demo --out docs/likelihood_table.md

A run directory is any `trainer.default_root_dir` where `lightning-dq test` wrote `evaluation.json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# (model, CIFAR-10, ImageNet-32, ImageNet-64, params, source). "old"/"new": the two downsampled-ImageNet
# versions (van den Oord 2016 vs Chrabaszcz 2017); numbers on different versions are not comparable.
# Tags: READ = read in the cited source; PwC = paperswithcode transcription; RECALLED = unverified;
# INFERRED = our reasoning; SECONDARY = from an unverified summary of the DQ paper.
PUBLISHED = [
    (
        "PixelCNN++ (AR)",
        "2.92",
        "-",
        "-",
        "53M [RECALLED]",
        "Salimans et al. 2017 [1]; github.com/openai/pixel-cnn README [READ]",
    ),
    ("PixelSNAIL (AR)", "2.85", "3.80 (old)", "-", "-", "Chen et al. 2018 [2], abstract [READ]; version [INFERRED]"),
    ("Image Transformer (AR)", "2.90", "3.77 (old)", "-", "-", "Parmar et al. 2018 [3] [PwC]"),
    ("Sparse Transformer (AR)", "2.80", "-", "3.44 (old)", "59M", "Child et al. 2019 [4] [PwC]; version [INFERRED]"),
    (
        "NVAE (hierarchical VAE)",
        "2.91",
        "3.92 (old) [RECALLED]",
        "-",
        "-",
        "Vahdat & Kautz 2020 [5]; github.com/NVlabs/NVAE README [READ]; IW bound",
    ),
    (
        "VDVAE (hierarchical VAE)",
        "2.87",
        "3.80 (old)",
        "3.52 (old)",
        "39M / 119M / 125M",
        "Child 2021 [6]; github.com/openai/vdvae README [READ]; negative ELBO",
    ),
    (
        "Efficient-VDVAE",
        "2.87",
        "3.58 (new)",
        "3.30 (new)",
        "-",
        "Hazami et al. 2022 [7]; its official repository's README [READ]",
    ),
    (
        "DenseFlow-74-10 (flow)",
        "2.98",
        "3.63 (new)",
        "3.35 (new)",
        "~130M",
        "Grcić et al. 2021 [8] [PwC]; its official repository's README [READ]",
    ),
    (
        "VDM (diffusion)",
        "2.65",
        "3.72 (old) [RECALLED]",
        "3.40 (old)",
        "-",
        "Kingma et al. 2021 [9] [PwC]; github.com/google-research/vdm README",
    ),
    (
        "DQ-AE, as claimed",
        "2.52",
        "3.12",
        "2.89",
        "22M claimed",
        "Fostiropoulos & Boehm 2022 [10] [SECONDARY: not checked against the paper's PDF]; most likely "
        "figure A (decoder only, code cost unpaid): not a bound",
    ),
]


REFERENCES = """\
Tags: [READ] read in the cited source; [PwC] transcribed from paperswithcode.com leaderboards, not checked in
the paper; [RECALLED] from memory, unverified; [INFERRED] our reasoning; [SECONDARY] from an unverified
summary of the paper, to be checked against its PDF.

1. T. Salimans, A. Karpathy, X. Chen, D. P. Kingma. PixelCNN++. ICLR 2017. arXiv:1701.05517; github.com/openai/pixel-cnn
2. X. Chen, N. Mishra, M. Rohaninejad, P. Abbeel. PixelSNAIL. ICML 2018. arXiv:1712.09763
3. N. Parmar et al. Image Transformer. ICML 2018. arXiv:1802.05751
4. R. Child, S. Gray, A. Radford, I. Sutskever. Generating Long Sequences with Sparse Transformers. arXiv:1904.10509
5. A. Vahdat, J. Kautz. NVAE: A Deep Hierarchical Variational Autoencoder. NeurIPS 2020. arXiv:2007.03898;
   github.com/NVlabs/NVAE
6. R. Child. Very Deep VAEs Generalize Autoregressive Models and Can Outperform Them on Images. ICLR 2021.
   arXiv:2011.10650;
   github.com/openai/vdvae
7. L. Hazami, R. Mama, R. Thurairatnam. Efficient-VDVAE: Less is more. arXiv:2203.13751
8. M. Grcić, I. Grubišić, S. Šegvić. Densely connected normalizing flows. NeurIPS 2021. arXiv:2106.04627
9. D. P. Kingma, T. Salimans, B. Poole, J. Ho. Variational Diffusion Models. NeurIPS 2021. arXiv:2107.00630;
   github.com/google-research/vdm
10. I. Fostiropoulos, B. Boehm. Implicit Feature Decoupling with Depthwise Quantization. CVPR 2022. arXiv:2203.08080;
   github.com/fostiropoulos/Depthwise-Quantization
"""


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def our_rows(runs: list[str]) -> list[str]:
    rows = []
    for run in runs:
        path = Path(run)
        path = path / "evaluation.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no evaluation.json; run `lightning-dq test ... --ckpt_path=<ckpt>` "
                f"with trainer.default_root_dir={path.parent} first"
            )
        r = json.loads(path.read_text())
        f = r["figures"]
        params = f"{r['autoencoder_parameters'] / 1e6:.2f}M"
        if r.get("prior_parameters"):
            params += f" + {r['prior_parameters'] / 1e6:.2f}M prior"
        figures = " | ".join(fmt(f[k]) for k in ("A bpd_decoder", "B bpd_uniform", "C bpd_prior"))
        images = r["num_images"] if r.get("whole_split") else f"{r['num_images']} of {r.get('split_size')} (PARTIAL)"
        run = f"{path.parent} | {r['data']} | {r['resolution']} | {images}"
        rows.append(f"| {run} | {figures} | {params} |")
    return rows


def build_table(runs: list[str]) -> str:
    ours = [
        "## Our runs (test split, every image once; bits/dim)\n",
        "A = decoder only (codes free: NOT a bound on -log2 p(x)); B = A + uniform code cost (a bound); "
        "C = A + learned-prior code cost (a bound, the headline).\n",
        "| run | data (version) | resolution | test images | A | B | C | parameters |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
        *our_rows(runs),
    ]
    published = [
        "\n## Published test bits/dim (lower is better; sources: the papers and official repositories below)\n",
        "| model | CIFAR-10 | ImageNet-32 | ImageNet-64 | parameters | source |",
        "| --- | ---: | ---: | ---: | --- | --- |",
        *(f"| {' | '.join(row)} |" for row in PUBLISHED),
        "\nOld and new downsampled-ImageNet versions are different datasets; only same-version numbers compare. "
        "Runs on the JPEG-decoded CIFAR-10 copy (`cifar10-jpeg75`) or the scikit-image sample photos are "
        "not comparable with any published CIFAR-10 number.",
        "",
        REFERENCES,
    ]
    return "\n".join(["# Likelihood table\n", *ours, *published]) + "\n"


def main(runs: list[str], out: str = "docs/likelihood_table.md") -> None:
    """Write the table for the run directories `runs` (or evaluation.json paths) to `out`.

    Args:
        runs: run directories holding evaluation.json.
        out: markdown output path.
    """
    table = build_table(runs)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(table)
    print(table)
    print(f"written to {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories holding evaluation.json (or the files)")
    parser.add_argument("--out", default="docs/likelihood_table.md", help="markdown output path")
    args = parser.parse_args()
    main(args.runs, args.out)

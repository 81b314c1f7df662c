"""The CausalFusion paper's numbers (ImageNet 256, from ``../shared/PAPER.md``), registered
as paper tables (``cfkit.paper``) by the causalfusion plugin: each table's columns are
``(metric plugin, S_eval)`` pairs and its rows are keyed by the bench variant that reproduces
them."""

from __future__ import annotations

from collections.abc import Callable

from cfkit.paper import PaperTable

FID_S = (("fid", 1), ("fid", 2), ("fid", 4), ("fid", 8))

TABLES: dict[str, PaperTable] = {
    "2": PaperTable(
        "Table 2: fixed S at training (rows) against S at evaluation", FID_S,
        {"1": (13.78, 356.69, 404.67, 390.18), "2": (16.69, 14.77, 47.49, 136.04),
         "4": (24.14, 15.37, 18.13, 33.14), "8": (54.08, 24.49, 22.66, 20.01),
         "256": (313.28, 321.62, 261.26, 192.25), "random": (21.31, 22.17, 23.54, 25.05)},
        "row 256 is one token per AR step (S = L); random is uniform S (γ = 1)"),
    "3a": PaperTable(
        "Table 3a: decay γ of P(S = k)", FID_S,
        {"1.0": (21.31, 22.17, 23.54, 25.05), "0.95": (14.49, 17.78, 19.79, 23.93),
         "0.9": (12.89, 15.57, 18.83, 22.72), "0.85": (12.94, 15.54, 19.12, 23.46),
         "0.8": (12.78, 15.42, 19.38, 23.78)}),
    "3b": PaperTable(
        "Table 3b: token order (γ = 0.9)", (("fid", 1),),
        {"raster": (14.46,), "block-raster-8": (14.76,), "block-raster-4": (14.62,),
         "dilated": (15.54,), "random": (12.89,)}),
    "3c": PaperTable(
        "Table 3c: AR loss weight w_max", FID_S[:3],
        {"1": (12.89, 15.57, 18.83), "1.5": (12.61, 15.49, 18.32), "2": (12.13, 15.15, 18.09),
         "2.5": (12.32, 15.22, 17.99), "3": (12.50, 15.28, 17.92)}),
    "7": PaperTable(
        "Table 7: timestep sampling", (("fid", 1),),
        {"shared": (12.13,), "per-step": (12.27,), "4-per-step": (12.19,), "8-per-step": (12.23,)}),
    "8": PaperTable(
        "Table 8: class tokens", (("fid", 1),),
        {"4": (12.13,), "16": (12.04,), "64": (11.84,), "1x64": (12.29,), "4x16": (11.75,)}),
    "6a": PaperTable(
        "Table 6a: CausalFusion against Transfusion (text-to-image FID-30k, zero-shot COCO CIDEr)",
        (("fid", 1), ("cider", None)),
        {"transfusion": (8.1, 34.5), "causalfusion-multimodal": (7.1, 47.9)}),
    "6b": PaperTable(
        "Table 6b: CausalFusion against DiT (FID, ImageNet accuracy)", (("fid", 1), ("probe", None)),
        {"dit": (18.2, 0.835), "causalfusion": (11.8, 0.842)},
        "the paper's ImageNet top-1 (83.5%, 84.2%) is of the fine-tuned network; cfkit's probe is linear"),
}


def constant(table: PaperTable) -> Callable[[], PaperTable]:
    """A factory without options that returns ``table``."""
    return lambda: table

"""Circuit discovery on ViTs: the computational graph, edge scores (exact / EAP / EAP-IG),
circuits and their faithfulness.

    >>> graph = Graph.from_model(model)                         # embed, heads (q/k/v), MLPs, logits
    >>> scores = edge_scores(model, clean, corrupted, metric, method="eap-ig", graph=graph)
    >>> circuit = Circuit.top_k(scores, 50)
    >>> evaluate(model, circuit, clean, corrupted, metric).faithfulness

Every method runs on the patching engine (the package installs no hooks itself); exact edge
patching is the oracle the estimates are checked against (docs/circuits.md).
"""

from patchlens.circuits.ablate import ABLATIONS
from patchlens.circuits.attribute import METHODS, edge_scores
from patchlens.circuits.circuit import Circuit
from patchlens.circuits.evaluate import (
    CircuitEvaluation,
    FaithfulnessCurve,
    evaluate,
    faithfulness_curve,
)
from patchlens.circuits.graph import Edge, Graph, GraphNode, Receiver
from patchlens.circuits.greedy import greedy_circuit
from patchlens.circuits.scores import EdgeScores, spearman

__all__ = [
    "Graph", "GraphNode", "Receiver", "Edge", "EdgeScores", "edge_scores", "Circuit",
    "evaluate", "faithfulness_curve", "CircuitEvaluation", "FaithfulnessCurve", "greedy_circuit",
    "spearman", "METHODS", "ABLATIONS",
]

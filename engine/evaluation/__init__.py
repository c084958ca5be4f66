"""Evaluation of every task: retrieval (meanP, fusion rerank, DSL), ranking metrics, caption metrics."""

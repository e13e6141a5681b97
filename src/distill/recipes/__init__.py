"""Starter pipeline files for `distill init` (package data), and the example data they use."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
RECIPES = {
    "cot": "chain-of-thought from any OpenAI-compatible server (vLLM, SGLang, llama.cpp, "
           "Ollama, transformers serve, OpenAI) into a LoRA student",
    "cot-local": "chain-of-thought from a local transformers teacher on this machine (CPU)",
    "instruct": "instruction-response pairs by self-instruct, judged by the teacher",
}


def recipe_text(name: str) -> str:
    return (HERE / f"{name}.yaml").read_text()


EXAMPLE_SEEDS = [
    {"id": "ex-1", "question": "A baker makes 24 muffins and sells 3 boxes of 6. How many "
     "muffins are left?", "answer": "6"},
    {"id": "ex-2", "question": "Sam reads 15 pages a day for 4 days, then 20 pages on the fifth "
     "day. How many pages did he read?", "answer": "80"},
    {"id": "ex-3", "question": "A ticket costs $12. How much do 7 tickets cost with a $9 "
     "discount on the total?", "answer": "75"},
]
EXAMPLE_EVAL = [
    {"question": "Mia has 5 bags of 8 apples and gives away 13 apples. How many are left?",
     "answer": "27"},
    {"question": "A car goes 60 miles an hour for 3 hours and 45 miles an hour for 2 hours. "
     "How far does it go?", "answer": "270"},
]
EXAMPLE_TASKS = [
    {"id": "t1", "instruction": "Explain what a hash table is to a beginner.", "input": "",
     "output": "A hash table stores values under keys ..."},
    {"id": "t2", "instruction": "Rewrite the sentence in the passive voice.",
     "input": "The cat chased the mouse.", "output": "The mouse was chased by the cat."},
    {"id": "t3", "instruction": "List three uses of a paper clip other than holding paper.",
     "input": "", "output": "1. A zipper pull ..."},
]

"""Prompt and scoring of the local multiple-choice task (lmms-eval imports this file through the YAML)."""
import re

LETTERS = "ABCD"


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, doc["choices"]))
    return f"{doc['question']}\n{options}\nAnswer with the option's letter from the given choices directly."


def process_results(doc, results):
    match = re.search(r"\b([A-D])\b", results[0])
    return {"mc_accuracy": float(match is not None and match.group(1) == doc["answer"])}

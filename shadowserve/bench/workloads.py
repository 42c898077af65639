"""Workloads built from text Python ships with (``pydoc_data.topics``), so nothing is downloaded."""

from __future__ import annotations

from shadowserve.model.tokenizer import Tokenizer

QUESTIONS = (
    "Summarize the document above in one sentence.",
    "What is the main topic of the document above?",
    "Name one keyword that the document above explains.",
    "Which Python statement does the document above describe first?",
    "Give one example from the document above.",
    "Is the document above about syntax or about the standard library?",
)


def documents(tokenizer: Tokenizer, count: int, tokens_each: int) -> list[str]:
    """``count`` distinct documents of about ``tokens_each`` tokens, cut from the help() topics."""
    from pydoc_data.topics import topics

    texts, current, size = [], [], 0
    for key in sorted(topics):
        body = topics[key].strip()
        current.append(body)
        size += len(tokenizer.encode(body))
        if size >= tokens_each:
            ids = tokenizer.encode("\n\n".join(current))[:tokens_each]
            texts.append(tokenizer.decode(ids))
            current, size = [], 0
            if len(texts) == count:
                return texts
    raise ValueError(f"pydoc topics hold fewer than {count} documents of {tokens_each} tokens")


def long_document_qa(tokenizer: Tokenizer, num_documents: int, questions_per_doc: int, doc_tokens: int) -> list[str]:
    """Prompts in long-document-QA style: each document followed by one of several questions."""
    prompts = []
    for doc in documents(tokenizer, num_documents, doc_tokens):
        for q in range(questions_per_doc):
            question = QUESTIONS[q % len(QUESTIONS)]
            messages = [{"role": "user", "content": f"{doc}\n\n{question}"}]
            prompts.append(tokenizer.apply_chat_template(messages))
    return prompts

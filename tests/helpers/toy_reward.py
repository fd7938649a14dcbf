"""A verifier for trainer tests: a random-init model must get both outcomes inside a group."""


def even_length(response: str, ground_truth: str) -> bool:
    return len(response) % 2 == 0

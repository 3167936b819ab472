"""The chat template's tokens around turns: a prompt's ids, and the ids that follow a sampled assistant turn.

Only these are tokenized; the sampled ids never are. What follows a turn is found by rendering a fixed
conversation with and without the observation messages and keeping the difference (the template's
own tokens after the assistant's end-of-turn token, the observations, the next assistant header), so
it is what the template itself would put there, whatever the template.
"""

from __future__ import annotations

from typing import Any

from iterft_ray.data.chat import template_ids

Messages = list[dict[str, Any]]
_BASE: Messages = [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}]


class TurnTemplate:
    """A tokenizer's chat template, seen from a trajectory: `prompt_ids`, `end_of_turn`, `observation_ids`, and a
    demonstration's ids built the same way (`conversation_ids`).

    `stops`: the tokens that end a sampled turn (the engine's); any special tokens will do where none sample
    (a warm-up), as templates end a turn with one.
    """

    def __init__(self, tokenizer, stops: list[int]):
        self.tokenizer = tokenizer
        self._base_ids = template_ids(tokenizer, _BASE)
        ends = [i for i, token in enumerate(self._base_ids) if token in stops]
        if not ends:
            raise ValueError("the chat template closes an assistant turn with none of the model's stop tokens "
                             f"{stops}; a sampled turn would never end where the template ends it")
        self.end_of_turn = self._base_ids[ends[-1]]  # appended (mask 0) after a turn cut by max_new_tokens
        self._after_turn = self._base_ids[ends[-1] + 1:]

    def prompt_ids(self, messages: Messages) -> list[int]:
        """The prompt as the engines sample from it: the template's tokens, the assistant's turn opened."""
        return template_ids(self.tokenizer, messages, add_generation_prompt=True)

    def observation_ids(self, observations: Messages) -> list[int]:
        """The ids after an assistant turn's end-of-turn token: the template's tokens between turns, the
        observation messages, and the next assistant turn opened."""
        full = template_ids(self.tokenizer, _BASE + observations, add_generation_prompt=True)
        if full[: len(self._base_ids)] != self._base_ids:
            raise ValueError("the chat template renders earlier turns differently once observations follow; "
                             "observation tokens cannot be appended to a trajectory")
        return self._after_turn + full[len(self._base_ids):]

    def conversation_ids(self, messages: Messages) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of a demonstration (TRL's `{"messages": [...]}`), built as the runner builds a
        trajectory: the prompt up to the first assistant message, then each assistant message's text tokenized
        with the end-of-turn token after it (labels: those ids), then the messages up to the next assistant one
        as observations (labels -100). So a warm-up shows the model exactly the ids it will sample from, not a
        rendering of the whole text, whose tokens at turn boundaries can differ."""
        first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), None)
        if not first:
            raise ValueError("a conversation needs a first message that is not the assistant's and an assistant "
                             "message after it")
        ids = self.prompt_ids(messages[:first])
        labels = [-100] * len(ids)
        i = first
        while i < len(messages):
            turn = self.tokenizer(messages[i]["content"], add_special_tokens=False)["input_ids"] + [self.end_of_turn]
            ids, labels = ids + turn, labels + turn
            following = i + 1
            while following < len(messages) and messages[following]["role"] != "assistant":
                following += 1
            if following < len(messages):  # observations, then the next assistant turn
                between = self.observation_ids(messages[i + 1:following])
                ids, labels = ids + between, labels + [-100] * len(between)
            i = following
        return ids, labels

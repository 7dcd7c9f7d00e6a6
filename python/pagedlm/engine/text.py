"""Incremental detokenization and stop strings: one implementation for offline generation
(LLM.generate) and the server (AsyncLLM), through SampleText, one sample's text as the
engine emits its tokens."""

from tokenizers.decoders import DecodeStream

REPLACEMENT = "\ufffd"
PREFIX_WINDOW = 6  # prompt tokens decoded with the first output tokens (context for merges)


def completion_text(tokenizer, prompt, output):
    """The text output adds to prompt: decoding the two together and dropping the prompt's text
    keeps the spaces and merges that decoding the output alone would lose."""
    if tokenizer is None or not output:
        return ""
    prompt_text, full_text = tokenizer.decode(prompt), tokenizer.decode(prompt + output)
    return full_text[len(prompt_text):] if full_text.startswith(prompt_text) else tokenizer.decode(output)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas. A byte-level BPE token can hold part
    of a multi-byte character; the delta then waits for the token that completes it. finish()
    returns whatever is left, so that the deltas add up to the text pagedlm.LLM gives offline.

    The tokenizers library's DecodeStream does the work, primed with the prompt's last tokens
    (context for merges and leading spaces): one call into Rust per token. Where it cannot run
    (the prompt ends inside a character, which its priming would emit, or it finds the text
    no longer extends what it emitted) a windowed decode takes over: the tokens from
    prefix_offset on against those from prefix_offset to read_offset, as vLLM's Python one,
    two decodes per token."""

    def __init__(self, tokenizer, prompt_ids):
        self.tokenizer = tokenizer
        self.prompt_len = len(prompt_ids)
        self.ids = list(prompt_ids)
        self.prefix_offset = max(len(self.ids) - PREFIX_WINDOW, 0)
        self.read_offset = len(self.ids)  # the tokens before it are in the text
        self.text = ""  # the output's text so far (what the deltas add up to)
        tail = self.ids[self.prefix_offset:]
        self.stream = (DecodeStream(ids=tail, skip_special_tokens=True)
                       if tokenizer is not None and not tokenizer.decode(tail).endswith(REPLACEMENT) else None)

    def add(self, new_ids):
        """Appends token ids; returns the text they complete ("" while a character is split)."""
        start = len(self.ids)
        self.ids.extend(new_ids)
        if self.tokenizer is None or not new_ids:
            return ""
        delta = self._streamed(start) if self.stream is not None else self._windowed()
        self.text += delta
        return delta

    def _streamed(self, start):
        pieces = []
        for i in range(start, len(self.ids)):
            try:
                piece = self.stream.step(self.tokenizer, self.ids[i])
            except Exception:  # tokenizers' InvalidPrefix: the windowed decode goes on from the text so far
                self.stream = None
                self.prefix_offset = max(self.read_offset - PREFIX_WINDOW, 0)
                return "".join(pieces) + self._windowed()
            if piece:
                pieces.append(piece)
                self.read_offset = i + 1
        return "".join(pieces)

    def _windowed(self):
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT) or not new_text.startswith(prefix_text):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text[len(prefix_text):]

    def finish(self):
        """The rest of the text once no token will come: the whole decode decides."""
        if self.tokenizer is None or len(self.ids) == self.prompt_len:
            return ""
        text = completion_text(self.tokenizer, self.ids[:self.prompt_len], self.ids[self.prompt_len:])
        delta = text[len(self.text):] if text.startswith(self.text) else ""
        self.text += delta
        return delta


class StopStrings:
    """Scans one sample's text for stop strings as it grows, across token boundaries; feed()
    returns the text that can be released now and whether a stop string was found (the text is
    then cut before it). A tail that could still become a stop string is held back, so no part
    of one is ever streamed."""

    def __init__(self, stops, include_stop=False):
        self.stops = [s for s in stops if s]
        self.include_stop = include_stop  # the text is cut after the stop string, not before
        self.text = ""       # everything seen
        self.released = 0    # characters of text already released
        self.stopped = False

    def feed(self, delta, final=False, search=True):
        """search False (min_tokens not reached yet): the text is released whole, and no stop
        string is looked for in it later (one may still begin after it)."""
        if self.stopped:
            return "", True
        if not search:
            self.text += delta
            return self._release(len(self.text)), False
        searched_from = max(self.released,
                            len(self.text) - max((len(s) for s in self.stops), default=1) + 1, 0)
        self.text += delta
        hits = [(i, s) for i, s in ((self.text.find(s, searched_from), s) for s in self.stops) if i >= 0]
        if hits:
            at, stop = min(hits, key=lambda hit: (hit[0], -len(hit[1])))
            self.text = self.text[:at + len(stop) if self.include_stop else at]
            self.stopped = True
            return self._release(len(self.text)), True
        end = len(self.text) if final else len(self.text) - self._partial_tail()
        return self._release(end), False

    def _release(self, end):
        out = self.text[self.released:end] if end > self.released else ""
        self.released = max(self.released, end)
        return out

    def _partial_tail(self):
        """The longest end of the text that begins some stop string (it may yet complete one)."""
        longest = 0
        for s in self.stops:
            for size in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:size]):
                    longest = size
                    break
        return longest


class SampleText:
    """One sample's text, token by token: its incremental decode and, if params has stop
    strings, their search. `text` is the text released so far (all of it once final; cut at the
    stop string once one is found); `stopped` tells whether one was."""

    def __init__(self, tokenizer, prompt_ids, params):
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stops = StopStrings(params.stop, params.include_stop_str_in_output) if params.stop else None
        self.min_tokens = params.min_tokens
        self.count = 0  # tokens fed
        self.text = ""
        self.stopped = False

    def add(self, token, final):
        """Feeds one emitted token (final: the sample ends with it); True when a stop string
        appears in the text. Stop strings are looked for once the sample has more than
        min_tokens tokens, as vLLM."""
        self.count += 1
        delta = self.detokenizer.add([token])
        if final:
            delta += self.detokenizer.finish()
        if self.stops is None:
            self.text += delta
            return False
        released, hit = self.stops.feed(delta, final=final or self.stopped, search=self.count > self.min_tokens)
        self.text += released
        self.stopped = self.stopped or hit
        return hit

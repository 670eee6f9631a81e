"""Token ids to text as they arrive: incremental detokenization and stop strings.

A token's text depends on its neighbours (a byte-level token may hold half a UTF-8 character; a
SentencePiece decoder drops the leading space of the first token it decodes), so each new piece is
the decode of a short window minus the decode of the window's start, and the U+FFFD that a piece
ends in (an incomplete character) waits for the next token; U+FFFDs before it are invalid bytes for
good, and sent. Text that could be the start of a stop string is held back too, so no client ever
sees part of a stop string.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what a decoder yields for an incomplete UTF-8 sequence


class TextStream:
    """The text of one generated sequence. add() a token id, then take() the text safe to send.

    text: everything decoded so far, cut before the first stop string once one appears (stopped).
    offsets: the index in `text` where each added token's text starts (legacy logprobs' text_offset).
    """

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.offsets: list[int] = []
        self.text = ""
        self.stopped = False
        self._start = 0  # ids[_start:_read] is the window's already-emitted context
        self._read = 0
        self._partial = 0  # characters of the text after ids[:_read] already emitted (an invalid byte run)
        self._sent = 0

    def add(self, token_id: int) -> None:
        """Append one token; a stop string completed by it cuts `text` and sets `stopped`."""
        if self.stopped:
            return
        self.ids.append(token_id)
        self.offsets.append(len(self.text))
        self._append(self._piece(final=False))

    def finish(self) -> None:
        """The sequence ended: decode whatever was held back for an incomplete character."""
        if not self.stopped:
            self._append(self._piece(final=True))

    def take(self, final: bool = False) -> str:
        """The text not yet taken that can no longer change: all of it when `final` or stopped, else
        short of a trailing part of a stop string."""
        end = len(self.text) if final or self.stopped else len(self.text) - self._stop_prefix()
        piece = self.text[self._sent:end] if end > self._sent else ""
        self._sent = max(self._sent, end)
        return piece

    def _piece(self, final: bool) -> str:
        if self._read == len(self.ids):
            return ""
        before = self.tokenizer.decode(self.ids[self._start:self._read])
        window = self.tokenizer.decode(self.ids[self._start:])
        new = window[len(before):]
        if final or (len(window) > len(before) and not window.endswith(REPLACEMENT)):
            piece = new[self._partial:]
            self._start, self._read, self._partial = self._read, len(self.ids), 0
            return piece
        # only a last U+FFFD can still become a character (the rest of the bytes are decided): send the rest
        stable = new[:-1] if new.endswith(REPLACEMENT) else new
        piece = stable[self._partial:]
        self._partial = max(self._partial, len(stable))
        return piece

    def _append(self, piece: str) -> None:
        if not piece:
            return
        searched = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        self.text += piece
        hits = [i for i in (self.text.find(s, searched) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True

    def _stop_prefix(self) -> int:
        """The length of the longest end of `text` that begins some stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:k]):
                    longest = k
                    break
        return longest


def token_text(tokenizer, token_id: int) -> str:
    """One token's text alone (U+FFFD where it holds part of a character), as logprobs show it."""
    return tokenizer.decode([token_id])


class TokenBytes:
    """Each token's own bytes, part of a character included (logprobs' `bytes`, which lets a client
    rebuild text that token_text shows as U+FFFD). Byte-level vocabularies (GPT-2, Llama 3) map each
    character of a token back to its byte; SentencePiece ones (Llama 2) spell a space `▁` and a
    fallback byte `<0x0A>`; for other decoders, and added tokens, the bytes are the UTF-8 of the
    token's text. A SentencePiece sequence's bytes keep the leading space its decode drops."""

    def __init__(self, tokenizer):
        import json

        self.tokenizer = tokenizer
        decoder = json.loads(tokenizer.hf.to_str()).get("decoder") or {}
        kinds = {d.get("type") for d in decoder.get("decoders", [decoder])}
        spm = kinds & {"ByteFallback", "Metaspace"}
        self.kind = "byte_level" if "ByteLevel" in kinds else "sentencepiece" if spm else None
        self.added = set(tokenizer.hf.get_added_tokens_decoder())
        self.unicode_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
        self._cache: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        if token_id not in self._cache:
            self._cache[token_id] = self._bytes(token_id)
        return self._cache[token_id]

    def _bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None or token_id in self.added or self.kind is None:
            return token_text(self.tokenizer, token_id).encode()
        if self.kind == "byte_level" and all(c in self.unicode_to_byte for c in piece):
            return bytes(self.unicode_to_byte[c] for c in piece)
        if self.kind == "sentencepiece" and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: each byte as a printable character (printable Latin-1 as itself, the rest from 256 on)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in kept}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table

"""Text from experiments and models, made safe to print on a terminal.

A log, a description or a hypothesis is written by code we do not control, so it may
hold escape sequences that clear the screen, move the cursor, retitle the window or
write the clipboard (OSC 52). `printable` removes every control sequence and control
character and keeps newlines and tabs.
"""

from __future__ import annotations

import re

# ESC-introduced sequences (ECMA-48), in their 7-bit and 8-bit (C1) forms:
#   CSI  ESC [ ... final byte          cursor moves, colours, clear screen
#   OSC  ESC ] ... BEL or ST           window title, clipboard, hyperlinks
#   DCS, SOS, PM, APC  ESC P/X/^/_ ... ST
#   two- and three-byte escapes        ESC 7, ESC c, ESC ( B ...
_SEQUENCE = re.compile(
    r"""
    (?:\x1b\[|\x9b) [\x30-\x3f]* [\x20-\x2f]* [\x40-\x7e]?           # CSI
  | (?:\x1b\]|\x9d) .*? (?:\x07|\x1b\\|\x9c|$)                       # OSC
  | (?:\x1b[PX^_]|[\x90\x98\x9e\x9f]) .*? (?:\x1b\\|\x9c|$)          # DCS SOS PM APC
  | \x1b [\x20-\x2f]* [\x30-\x7e]?                                    # other escapes
    """,
    re.VERBOSE | re.MULTILINE,  # an unterminated string ends at its line
)
# What is left that a terminal acts on: C0 controls but tab and newline, DEL, C1 controls.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` without control sequences or control characters; newlines and tabs stay."""
    text = text.replace("\r\n", "\n")
    return _CONTROL.sub("", _SEQUENCE.sub("", text))

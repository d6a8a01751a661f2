#!/usr/bin/env bash
# Makes assets/audio/speech.wav: one second of silence, a synthetic English sentence (espeak-ng),
# one second of silence; 16 kHz mono 16-bit. Needs Debian's espeak-ng and sox.
set -euo pipefail
out=$(cd "$(dirname "$0")/.." && pwd)/assets/audio/speech.wav
tmp=$(mktemp -d)
espeak-ng -v en -s 150 -w "$tmp/voice.wav" "Relevance propagation explains where the speech is."
sox "$tmp/voice.wav" -r 16000 -c 1 -b 16 "$tmp/voice16.wav"
sox -n -r 16000 -c 1 -b 16 "$tmp/silence.wav" trim 0.0 1.0
sox "$tmp/silence.wav" "$tmp/voice16.wav" "$tmp/silence.wav" "$out"
rm -r "$tmp"
soxi "$out"

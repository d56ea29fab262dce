#!/usr/bin/env bash
# Debian packages the test suite needs. Installs only what is missing, and only when we can (root + apt).
set -euo pipefail

need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)   # promtool and the Prometheus server (deploy tests)
command -v npm >/dev/null 2>&1 || need+=(nodejs npm)   # regenerating the Grafana dashboard schema
command -v tesseract >/dev/null 2>&1 || need+=(tesseract-ocr)   # the CPU OCR engine
# One traineddata pack per supported language (ocrbooth.models.ocr.tesseract.SUPPORTED_LANGUAGES).
for lang in eng fra deu spa ita nld por swe dan; do
  dpkg-query -W -f='${Status}' "tesseract-ocr-${lang}" 2>/dev/null | grep -q "install ok installed" \
    || need+=("tesseract-ocr-${lang}")
done
# Tesseract's orientation-and-script model: pages scanned sideways or upside down are turned upright.
dpkg-query -W -f='${Status}' tesseract-ocr-osd 2>/dev/null | grep -q "install ok installed" \
  || need+=(tesseract-ocr-osd)

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install-system-deps: missing ${need[*]}; install them with your package manager (needs root + apt here)" >&2
  exit 0
fi
echo "install-system-deps: apt-get install ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null

#!/usr/bin/env bash
# Install Debian's chromium for the browser test of the HTML report, where it is missing.
# Never fails: without chromium the browser test skips with a message saying why.
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium for the report browser test (apt-get)..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
    >/tmp/patchlens-chromium-install.log 2>&1 \
    || echo "could not install chromium (see /tmp/patchlens-chromium-install.log); the browser test will skip"
else
  echo "chromium missing and cannot be installed here (not root or no apt-get); the browser test will skip"
fi
exit 0

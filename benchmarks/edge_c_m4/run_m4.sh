#!/bin/sh
# Build a C engine export for a Cortex-M4 (QEMU mps2-an386), run it on raw uint8 images, and
# count the predictions that differ from the host build's.
#   benchmarks/edge_c_m4/run_m4.sh EXPORT_DIR IMAGES.u8 IMAGE_BYTES
# Needs gcc-arm-none-eabi, libnewlib-arm-none-eabi and qemu-system-arm (Debian packages).
set -e
export_dir=$(cd "$1" && pwd); images=$(cd "$(dirname "$2")" && pwd)/$(basename "$2"); size=$3
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
cp "$export_dir"/snn_model.[ch] "$export_dir"/snn_runtime.[ch] "$here"/startup.c "$here"/main_m4.c "$here"/m4.ld "$work"/
python3 - "$images" "$size" > "$work/images.h" <<'PY'
import sys
data, size = open(sys.argv[1], "rb").read(), int(sys.argv[2])
rows = [data[i:i + size] for i in range(0, len(data) - size + 1, size)]
print(f"#define TEST_IMAGES {len(rows)}\nstatic const uint8_t test_images[{len(rows)}][{size}] = {{")
print(",\n".join("{" + ",".join(map(str, r)) + "}" for r in rows) + "};")
PY
cd "$work"
arm-none-eabi-gcc -mcpu=cortex-m4 -mthumb -mfloat-abi=hard -mfpu=fpv4-sp-d16 -Os -std=c99 --specs=rdimon.specs \
    -T m4.ld -nostartfiles -o snn.elf startup.c main_m4.c snn_model.c snn_runtime.c -lrdimon
arm-none-eabi-size snn.elf
timeout 600 qemu-system-arm -M mps2-an386 -nographic -semihosting -kernel snn.elf > m4.txt
cc -O2 -o snn_host "$export_dir"/*.c
./snn_host < "$images" | cut -d' ' -f1 > host.txt
echo "cortex-m4 (qemu mps2-an386): $(wc -l < m4.txt) images, $(diff host.txt m4.txt | grep -c '^>' || true) predictions differ from the host build"
rm -rf "$work"

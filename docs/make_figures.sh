#!/bin/bash
# Makes the README's face figures from the shipped model. Run from the repository root
# after `fdiff data synth-celeba data/synth_faces --num 20000` (the edit photo is a
# test-split face of that dataset, which the model never saw).
set -euo pipefail
W=pretrained/synth-faces
fdiff sample --workdir $W --attributes-file docs/faces_prompts.txt --num 8 --seed 0 \
  --scale 2 --out docs/faces_prompts.png
for pair in "smile:-Smiling:Smiling" "glasses:-Eyeglasses:Eyeglasses" \
    "hair:Black_Hair,-Blond_Hair:-Black_Hair,Blond_Hair" "age:Young:-Young"; do
  IFS=: read -r name from to <<< "$pair"
  fdiff interpolate --workdir $W --from="$from" --to="$to" --frames 8 --seeds 0,1 \
    --scale 2 --out docs/faces_interpolate_$name.png
done
python - <<'PY'
import zipfile
with zipfile.ZipFile('data/synth_faces/img_align_celeba.zip') as z:
  open('docs/faces_heldout.jpg', 'wb').write(z.read('img_align_celeba/019001.jpg'))
PY
SOURCE=$(python -c "
from fdiff_jax.data.synth_celeba import RENDERED_ATTRIBUTES as R
row = [l.split() for l in open('data/synth_faces/list_attr_celeba.txt') if l.startswith('019001.jpg')][0]
names = open('data/synth_faces/list_attr_celeba.txt').readlines()[1].split()
print(','.join(('' if v == '1' else '-') + n for n, v in zip(names, row[1:]) if n in R and n != 'No_Beard'))")
echo "019001.jpg: $SOURCE"
for method in inversion sdedit; do
  fdiff edit --workdir $W --image docs/faces_heldout.jpg --source "$SOURCE" \
    --set "Eyeglasses,Smiling" --method $method --steps 100 --scale 3 \
    --out docs/faces_edit_$method.png
done
rm docs/faces_heldout.jpg
# The first eight interpolation strips of `fdiff evaluate` at w = 3 (docs/synth_faces.md).
STRIPS=runs/eval_faces/samples/synth-faces_w3_interp.png
if [ -f $STRIPS ]; then
  python -c "
from PIL import Image
im = Image.open('$STRIPS')
pitch = (im.width - 2) // 8  # A strip is a row of 8 frames, each with its 2-pixel gap.
top = im.crop((0, 0, im.width, 8 * pitch + 2))
top.resize((2 * top.width, 2 * top.height), Image.NEAREST).save('docs/faces_eval_strips.png')"
else
  echo "skipped docs/faces_eval_strips.png: run the evaluation of docs/synth_faces.md first"
fi

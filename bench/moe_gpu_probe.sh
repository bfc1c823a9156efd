set -e
export PYTHONPATH=$PWD:$PWD/kernels:$PWD/tests
python - <<'PY'
import transformers as tf, torch
from helpers_tokenizer import make_tiny_tokenizer
c = tf.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                   num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5,
                   rope_theta=100000.0, bos_token_id=1, eos_token_id=2, pad_token_id=2)
torch.manual_seed(0)
m = tf.LlamaForCausalLM(c)
m.save_pretrained("/tmp/rnd"); make_tiny_tokenizer().save_pretrained("/tmp/rnd")
PY
cat docs/*.md README.md effconv/*.py > /tmp/text.txt; for i in 1 2 3 4 5 6; do cat /tmp/text.txt; done > /tmp/text6.txt
timeout 400 python -m effconv.cli moe-upcycle --recipe recipes/smollm2-135m-moe-8x2.yaml --model /tmp/rnd --data /tmp/text6.txt --tokens 3276800 --eval-every 50 --no-progress --out /tmp/m 2>&1 | grep -v "it/s\]" | tail -15
python -c "import json;d=json.load(open('/tmp/m/effconv.json'));m=d['metrics'];print(json.dumps({k:m[k] for k in m if k!='distillation'}));x=m['distillation'];print({k:x[k] for k in ('steps','tokens','seconds','first_train_loss','final_train_loss')}, x['tokens']/x['seconds'],'tok/s', d['export_format'])"
cp /tmp/m/effconv.json $OUT/

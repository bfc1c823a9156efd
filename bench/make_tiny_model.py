"""Write a tiny random Llama teacher + tokenizer + training text to a directory (smoke tests on a GPU machine)."""
import sys, torch, transformers as tf
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent / "tests"))
from helpers_tokenizer import make_tiny_tokenizer
tok = make_tiny_tokenizer()
torch.manual_seed(0)
cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
m = tf.LlamaForCausalLM(cfg)
m.save_pretrained(sys.argv[1]); tok.save_pretrained(sys.argv[1])
open(sys.argv[1]+"/train.txt","w").write(("The quick brown fox jumps over the lazy dog. " * 40 + "\n\n") * 30)
print(len(tok))

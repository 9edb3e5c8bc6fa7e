#!/usr/bin/env python3
"""llama.cpp and Ember on the same converted GGUF, on the shared reference prompts.

For each GGUF given (e.g. the f16 and q8_0 files `cargo xtask convert` makes from an HF
directory) and each non-chat prompt in shared/reference/<prefix>*.json, llama.cpp's `refgen`
decodes 32 greedy tokens with top-5 logits at every step; Ember then
  1. generates greedily from the same prompt (`ember generate --json`): prompt tokens and all
     32 generated tokens must be equal;
  2. scores the same tokens teacher-forced in one batch (`ember logits --json`): reported, not
     required (llama.cpp's own arithmetic differs between a batch and one-token steps for some
     types, e.g. Q8_0, so a batch cannot be compared with steps bit for bit).
Exits 1 if any token differs. Usage:
  llamacpp_prompts.py --ember target/release/ember --refgen ~/.cache/ember-ref/build/bin/refgen \
      --refs ../shared/reference --prefix smollm2_p MODEL.gguf [MODEL.gguf ...]
"""
import argparse, glob, json, os, subprocess, sys, tempfile

ap = argparse.ArgumentParser()
ap.add_argument('--ember', required=True)
ap.add_argument('--refgen', required=True)
ap.add_argument('--refs', required=True)
ap.add_argument('--prefix', default='smollm2_p')
ap.add_argument('models', nargs='+')
a = ap.parse_args()
work = tempfile.mkdtemp(prefix='llamacpp-prompts-')
bad = 0
for model in a.models:
    for ref in sorted(glob.glob(os.path.join(a.refs, a.prefix + '*.json'))):
        name = os.path.basename(ref)[:-5]
        prompt = json.load(open(ref))['prompt_text']
        pf = os.path.join(work, name + '.txt')
        open(pf, 'w').write(prompt)
        out = os.path.join(work, name + '.out.json')
        subprocess.run([a.refgen, '-m', model, '-f', pf, '-n', '32', '-t', '2', '-k', '5', '-c', '2048',
                        '-o', out], capture_output=True, check=True)
        d = json.load(open(out))
        P, G = d['prompt_tokens'], d['generated_tokens']
        e = json.loads(subprocess.run([a.ember, 'generate', '-m', model, '--stdin', '-n', str(len(G)),
                                       '--temperature', '0', '--ignore-eos', '--json'],
                                      input=prompt.encode(), capture_output=True, check=True).stdout)
        same = sum(x == y for x, y in zip(e['tokens'], G))
        ok = e['prompt_tokens'] == P and same == len(G)
        steps = [d['prompt_last_topk']] + d['step_topk_after_each_generated_token']
        feed = P + G[:len(steps) - 1]
        lg = json.loads(subprocess.run([a.ember, 'logits', '-m', model, '--tokens', ','.join(map(str, feed)),
                                        '--json'], capture_output=True, check=True).stdout)
        pos = {p['pos']: p['top'] for p in lg['positions']}
        ids = sum([t for t, _ in steps[i]] == [t for t, _ in pos[len(P) - 1 + i]] for i in range(len(steps)))
        first = max(abs(x - y) for (_, x), (_, y) in zip(steps[0], pos[len(P) - 1]))
        print(f"{'ok ' if ok else 'BAD'} {os.path.basename(model):18} {name:24} prompt {len(P):3} tokens "
              f"{'equal' if e['prompt_tokens'] == P else 'DIFFER'}; greedy {same}/{len(G)}; last prompt "
              f"position top-5 max |dlogit| {first:.2e}; teacher-forced top-5 ids equal at {ids}/{len(steps)}")
        bad += not ok
sys.exit(1 if bad else 0)

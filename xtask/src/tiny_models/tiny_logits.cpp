// tiny-logits: llama.cpp's teacher-forced logits for a token sequence, every position, full
// rows. Built and run by `cargo xtask tiny-models` against llama.cpp's static libraries.
//   tiny-logits -m MODEL --tokens 1,2,3 [-t THREADS] [-c N_CTX]
// Prints JSON: {"n_vocab", "tokens", "ctx": {...}, "logits": [[...], ...]}.
#include "llama.h"
#include <clocale>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

int main(int argc, char ** argv) {
    std::setlocale(LC_NUMERIC, "C");
    std::string model_path, tokens_arg;
    int n_threads = 2, n_ctx = 64;
    bool kv_f32 = false;
    for (int i = 1; i + 1 < argc; i += 2) {
        std::string a = argv[i];
        if (a == "-m") model_path = argv[i + 1];
        else if (a == "--tokens") tokens_arg = argv[i + 1];
        else if (a == "-t") n_threads = atoi(argv[i + 1]);
        else if (a == "-c") n_ctx = atoi(argv[i + 1]);
        else if (a == "--kv") kv_f32 = std::string(argv[i + 1]) == "f32";
        else { fprintf(stderr, "unknown arg %s\n", a.c_str()); return 1; }
    }
    std::vector<llama_token> toks;
    {
        std::stringstream ss(tokens_arg);
        std::string t;
        while (std::getline(ss, t, ',')) toks.push_back(atoi(t.c_str()));
    }
    if (model_path.empty() || toks.empty()) { fprintf(stderr, "usage: tiny-logits -m MODEL --tokens 1,2,3\n"); return 1; }

    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    llama_model * model = llama_model_load_from_file(model_path.c_str(), mp);
    if (!model) { fprintf(stderr, "load failed\n"); return 1; }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    const int n = (int) toks.size();

    // llama.cpp's defaults otherwise (f16 KV cache, flash attention auto), as refgen.
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n_ctx;
    cp.n_batch = n;
    cp.n_ubatch = n;
    cp.n_threads = n_threads;
    cp.n_threads_batch = n_threads;
    if (kv_f32) { cp.type_k = GGML_TYPE_F32; cp.type_v = GGML_TYPE_F32; }
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "ctx failed\n"); return 1; }

    // One batch, every row's logits: teacher forcing.
    llama_batch_ext * batch = llama_batch_ext_init(ctx);
    for (int i = 0; i < n; i++) {
        int idx = llama_batch_ext_add_token(batch, 0, toks[i]);
        llama_pos p = i;
        llama_batch_ext_set_pos(batch, idx, &p);
        llama_batch_ext_set_output_logits(batch, idx, true);
    }
    if (llama_process(ctx, LLAMA_PROCESS_TYPE_DECODE, batch)) { fprintf(stderr, "decode failed\n"); return 1; }

    printf("{\"n_vocab\":%d,\"tokens\":[", n_vocab);
    for (int i = 0; i < n; i++) printf("%s%d", i ? "," : "", toks[i]);
    printf("],\"ctx\":{\"n_ctx\":%u,\"n_ubatch\":%u,\"n_threads\":%d,\"type_k\":%d,\"type_v\":%d,\"flash_attn_type\":%d},\"logits\":[",
           llama_n_ctx(ctx), llama_n_ubatch(ctx), n_threads, (int) cp.type_k, (int) cp.type_v, (int) cp.flash_attn_type);
    for (int i = 0; i < n; i++) {
        const float * lg = llama_get_logits_ith(ctx, i);
        if (!lg) { fprintf(stderr, "no logits for row %d\n", i); return 1; }
        printf("%s[", i ? "," : "");
        for (int v = 0; v < n_vocab; v++) printf("%s%.7g", v ? "," : "", lg[v]);
        printf("]");
    }
    printf("]}\n");
    llama_batch_ext_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}

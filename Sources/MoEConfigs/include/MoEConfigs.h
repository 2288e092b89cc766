// Kernel config tables shipped with swift-fused-moe, embedded at build time.
#ifndef MOE_CONFIGS_H
#define MOE_CONFIGS_H

/// configs.json: an object mapping SGLang config file names
/// (`E=..,N=..,device_name=...json`) to their tables.
const char *moe_configs_json(void);

#endif

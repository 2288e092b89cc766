// Embeds configs.json (written by `fused-moe tune`) with C23 #embed.
#include "MoEConfigs.h"

#pragma clang diagnostic ignored "-Wc23-extensions"

static const char configs[] = {
#embed "configs.json"
    , 0};

const char *moe_configs_json(void) { return configs; }

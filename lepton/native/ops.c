/* The entry point ONNX Runtime calls when a session registers Lepton's library
 * (SessionOptions.register_custom_ops_library): the ai.lepton domain and its operators. */
#include "ort.h"

const void *const *lepton_api;

__attribute__((visibility("default"))) OrtStatus *RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
    lepton_api = base->GetApi(API_VERSION);
    if (!lepton_api) return NULL; /* NOTE: an ONNX Runtime older than API_VERSION: nothing registered, the graph fails to load */
    OrtCustomOpDomain *domain = NULL;
    TRY(API(CreateCustomOpDomainFn, API_CREATE_CUSTOM_OP_DOMAIN)("ai.lepton", &domain));
    TRY(API(CustomOpDomainAddFn, API_CUSTOM_OP_DOMAIN_ADD)(domain, &lepton_slot_attention));
    TRY(API(CustomOpDomainAddFn, API_CUSTOM_OP_DOMAIN_ADD)(domain, &lepton_slot_attention_f16));
    TRY(API(CustomOpDomainAddFn, API_CUSTOM_OP_DOMAIN_ADD)(domain, &lepton_slot_attention_i8));
    TRY(API(CustomOpDomainAddFn, API_CUSTOM_OP_DOMAIN_ADD)(domain, &lepton_q8_matmul));
    TRY(API(CustomOpDomainAddFn, API_CUSTOM_OP_DOMAIN_ADD)(domain, &lepton_q4_matmul));
    TRY(API(CustomOpDomainAddFn, API_CUSTOM_OP_DOMAIN_ADD)(domain, &lepton_bf16_matmul));
    TRY(API(CustomOpDomainAddFn, API_CUSTOM_OP_DOMAIN_ADD)(domain, &lepton_f32_matmul));
    TRY(API(CustomOpDomainAddFn, API_CUSTOM_OP_DOMAIN_ADD)(domain, &lepton_topk_rescore));
    return API(AddCustomOpDomainFn, API_ADD_CUSTOM_OP_DOMAIN)(options, domain);
}

"""Third-party segmentation models for the conversion sweep, random init, built from configs.

Each factory returns a small instance of a public architecture (nothing is downloaded):
segmentation_models_pytorch decoders over several encoder families, and HuggingFace
segmenters built from their configs.
"""
NUM_CLASSES = 5


# ----------------------------------------------------------------- segmentation_models_pytorch
def smp_unet_resnet18():
    import segmentation_models_pytorch as smp

    return smp.Unet("resnet18", encoder_weights=None, classes=NUM_CLASSES)


def smp_fpn_efficientnet_b0():
    import segmentation_models_pytorch as smp

    return smp.FPN("efficientnet-b0", encoder_weights=None, classes=NUM_CLASSES)


def smp_deeplabv3plus_mobilenet_v2():
    import segmentation_models_pytorch as smp

    return smp.DeepLabV3Plus("mobilenet_v2", encoder_weights=None, classes=NUM_CLASSES)


def smp_segformer_mit_b0():
    import segmentation_models_pytorch as smp

    return smp.Segformer("mit_b0", encoder_weights=None, classes=NUM_CLASSES)


def smp_unet_hrnet_w18_small():
    import segmentation_models_pytorch as smp

    return smp.Unet("tu-hrnet_w18_small", encoder_weights=None, classes=NUM_CLASSES)


def smp_pan_convnext_atto():
    import segmentation_models_pytorch as smp

    return smp.PAN("tu-convnext_atto", encoder_weights=None, classes=NUM_CLASSES)


# ----------------------------------------------------------------- HuggingFace transformers
def hf_segformer():
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    return SegformerForSemanticSegmentation(SegformerConfig(
        num_labels=NUM_CLASSES, depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128], decoder_hidden_size=64,
        num_attention_heads=[1, 1, 2, 4]))


def hf_upernet_convnext():
    from transformers import ConvNextConfig, UperNetConfig, UperNetForSemanticSegmentation

    backbone = ConvNextConfig(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128],
                              out_features=["stage1", "stage2", "stage3", "stage4"])
    return UperNetForSemanticSegmentation(UperNetConfig(backbone_config=backbone, hidden_size=64, num_labels=NUM_CLASSES,
                                                        use_auxiliary_head=False))


def hf_upernet_swin():
    from transformers import SwinConfig, UperNetConfig, UperNetForSemanticSegmentation

    backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 4], window_size=4,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    return UperNetForSemanticSegmentation(UperNetConfig(backbone_config=backbone, hidden_size=64, num_labels=NUM_CLASSES,
                                                        use_auxiliary_head=False))


def hf_dpt():
    from transformers import DPTConfig, DPTForSemanticSegmentation

    return DPTForSemanticSegmentation(DPTConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128, image_size=64, patch_size=16,
        backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[16, 32, 64, 64], fusion_hidden_size=32,
        num_labels=NUM_CLASSES, use_auxiliary_head=False))


def hf_beit():
    from transformers import BeitConfig, BeitForSemanticSegmentation

    return BeitForSemanticSegmentation(BeitConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128, image_size=64, patch_size=16,
        out_indices=[0, 1, 2, 3], num_labels=NUM_CLASSES, use_auxiliary_head=False, pool_scales=[1, 2]))


def hf_mobilevit():
    from transformers import MobileViTConfig, MobileViTForSemanticSegmentation

    return MobileViTForSemanticSegmentation(MobileViTConfig(
        image_size=64, hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 16, 24, 32, 48, 64, 160],
        num_labels=NUM_CLASSES, aspp_out_channels=32))


def smp_dpt_vit_tiny():
    import segmentation_models_pytorch as smp

    return smp.DPT("tu-vit_tiny_patch16_224", encoder_weights=None, classes=NUM_CLASSES, img_size=64,
                   decoder_intermediate_channels=(32, 64, 96, 96), decoder_fusion_channels=32)


# ----------------------------------------------------------------- mask classification (a class and a mask per query)
def _resnet_backbone():
    from transformers import ResNetConfig

    return ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="basic",
                        out_features=["stage1", "stage2", "stage3", "stage4"])


def _swin_backbone():
    from transformers import SwinConfig

    return SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4, drop_path_rate=0.0,
                      out_features=["stage1", "stage2", "stage3", "stage4"])


def _mask2former(backbone):
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation

    return Mask2FormerForUniversalSegmentation(Mask2FormerConfig(
        backbone_config=backbone, num_labels=NUM_CLASSES, num_queries=10, feature_size=32, mask_feature_size=32, hidden_dim=32,
        encoder_feedforward_dim=64, dim_feedforward=64, encoder_layers=1, decoder_layers=2, num_attention_heads=2))


def hf_mask2former_resnet():
    return _mask2former(_resnet_backbone())


def hf_mask2former_swin():
    return _mask2former(_swin_backbone())


def hf_maskformer_resnet():
    from transformers import MaskFormerConfig, MaskFormerForInstanceSegmentation

    decoder = {"model_type": "detr", "encoder_layers": 1, "decoder_layers": 1, "d_model": 32, "encoder_attention_heads": 2,
               "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "num_queries": 10}
    return MaskFormerForInstanceSegmentation(MaskFormerConfig(
        backbone_config=_resnet_backbone(), decoder_config=decoder, num_labels=NUM_CLASSES, fpn_feature_size=32,
        mask_feature_size=32))


def hf_oneformer_resnet():
    from transformers import OneFormerConfig, OneFormerForUniversalSegmentation

    return OneFormerForUniversalSegmentation(OneFormerConfig(
        backbone_config=_resnet_backbone(), num_labels=NUM_CLASSES, num_queries=10, conv_dim=32, mask_dim=32, hidden_dim=32,
        encoder_feedforward_dim=64, dim_feedforward=64, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
        query_dec_layers=1, text_encoder_width=32, text_encoder_context_length=8, text_encoder_num_layers=1,
        text_encoder_n_ctx=2))

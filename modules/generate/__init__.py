"""Generate tab: text-to-image with the ModelManager's pipeline and up to four LoRAs."""


def initialize(global_translations, model_manager, gestionnaire, global_config):
    from modules.generate.tab import GenerateTab

    return GenerateTab(
        model_manager=model_manager,
        config=global_config,
        translations=global_translations,
        actions=getattr(gestionnaire, "actions", None),
        queue=getattr(gestionnaire, "queue", None),
    )
